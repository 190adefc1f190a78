"""The suite's own set-up (tests/conftest.py): one OpenMP thread per process, set before torch reads it,
the grouping of test files into processes under pytest-xdist, and the timeout that ends a hung test."""

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


def test_under_xdist_loadfile_the_files_that_read_the_session_export_share_one_process(pytestconfig, monkeypatch):
    """tests/conftest.py's scheduler: a file's tests stay together, and test_onnx_export.py goes
    with test_export.py (one build of ``tiny_onnx``); other ``--dist`` modes keep xdist's own."""
    from tests.conftest import pytest_xdist_make_scheduler

    monkeypatch.setattr(pytestconfig.option, "dist", "loadfile", raising=False)
    monkeypatch.setattr(pytestconfig.option, "tx", ["popen"], raising=False)
    scheduler = pytest_xdist_make_scheduler(pytestconfig, log=None)
    scope = scheduler._split_scope
    assert (
        scope("tests/test_onnx_export.py::test_a[x]") == scope("tests/test_export.py::test_b") == "tests/test_export.py"
    )
    assert (
        scope("tests/test_fleet.py::test_c") == scope("tests/test_fleet.py::test_d") != scope("tests/test_triton.py::t")
    )
    monkeypatch.setattr(pytestconfig.option, "dist", "load")
    assert pytest_xdist_make_scheduler(pytestconfig, log=None) is None


def test_a_test_that_hangs_fails_with_its_stack_instead_of_holding_the_run(pytestconfig, tmp_path):
    """pyproject.toml's pytest-timeout setting: a hang (here a wait on a pipe nobody writes, as a
    server's output once was) fails that test in an xdist process, and the run goes on to the next."""
    assert int(pytestconfig.getini("timeout")) == 600
    (tmp_path / "test_hang.py").write_text(
        "import os\n\ndef test_hangs():\n    read, _ = os.pipe()\n    os.read(read, 1)\n\ndef test_after():\n    pass\n"
    )
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "1", "-o", "timeout=2"]
        + ["-c", str(REPO / "pyproject.toml"), "--rootdir", str(tmp_path), str(tmp_path / "test_hang.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 1, child.stdout[-3000:]
    assert "Timeout" in child.stdout and "os.read(read, 1)" in child.stdout, child.stdout[-3000:]
    assert "1 failed, 1 passed" in child.stdout, child.stdout[-3000:]
