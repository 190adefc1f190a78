"""The tiers' import rules (pyproject.toml's import-linter contracts) hold, and they can fail:
the same check over a copy of the tree with one forbidden import added reports that contract."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

LINT_IMPORTS = str(Path(sys.executable).parent / "lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [LINT_IMPORTS, "--no-cache"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(root)},
    )


def test_the_import_contracts_hold():
    done = lint_imports(REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("runners/front/queue.py", "import torch", "The front never imports torch"),
        ("runners/front/store.py", "from runners.pipeline import inpaint", "The front never imports torch"),
        ("runners/worker/ledger.py", "from runners.front import queue", "The model tiers never import the front"),
        ("runners/protocol/schema.py", "from runners.worker import board", "What crosses tiers imports no tier"),
        ("runners/pipeline/safety.py", "import export.build", "The server never imports the export stage"),
    ],
)
def test_a_forbidden_import_breaks_its_contract(tmp_path, module, line, contract):
    for name in ("runners", "export", "benchmarks"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    path = tmp_path / module
    path.write_text(path.read_text() + f"\n{line}  # added by the test\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0
    broken = done.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, done.stdout[-3000:]


def test_the_front_process_loads_no_model_library():
    """What the import graph says, seen at run time: the front's modules import without torch."""
    script = (
        "import sys, runners.front.app, runners.front.fal_http, runners.front.triton_client; "
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
