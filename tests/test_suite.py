"""The suite's own set-up: the thread setting tests/conftest.py makes lands before torch reads it."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from tests.conftest import REPO


def test_torch_in_the_test_process_runs_the_threads_the_setting_says():
    """conftest sets OMP_NUM_THREADS=1 (unless set already) before anything imports torch: a torch
    imported first would keep one thread per core, spinning against the suite's other processes."""
    assert torch.get_num_threads() == int(os.environ["OMP_NUM_THREADS"])


def test_a_server_started_by_a_test_gets_the_same_setting():
    """Servers inherit the test process's environment (benchmarks/serving.py): a child's torch runs
    the same thread count (here a plain interpreter in the repository, as a server's processes are)."""
    child = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 0, child.stderr[-2000:]
    assert int(child.stdout) == int(os.environ["OMP_NUM_THREADS"])
