"""`bentoml build` of both bentofiles, into a temporary BentoML home, offline; then what the Bento
holds: the service entry, the server's code and nothing else, the pinned packages, the image's
base and environment. (`bentoml containerize` needs a container engine: not run here.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.test_deploy import setting_env_names

BENTOFILES = {"bentofile.yaml": "flux_inpaint", "deploy/bentofile.tensorrt.yaml": "flux_inpaint_tensorrt"}


def build(bentofile: str, home: Path) -> Path:
    env = {**os.environ, "BENTOML_HOME": str(home), "HF_HUB_OFFLINE": "1", "BENTOML_DO_NOT_TRACK": "true"}
    # No network: lock_packages is off, and nothing else in a build reaches out.
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        env[proxy] = "http://127.0.0.1:9"
    built = subprocess.run(
        [str(Path(sys.executable).parent / "bentoml"), "build", "-f", bentofile, "-o", "tag", "."],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    name, version = re.search(r"__tag__:(\S+):(\S+)", built.stdout).groups()
    assert name == BENTOFILES[bentofile]
    return home / "bentos" / name / version


@pytest.fixture(scope="module")
def bentos(tmp_path_factory) -> dict[str, Path]:
    home = tmp_path_factory.mktemp("bentoml-home")
    return {bentofile: build(bentofile, home) for bentofile in BENTOFILES}


@pytest.fixture(params=sorted(BENTOFILES))
def bento(request, bentos) -> Path:
    return bentos[request.param]


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_entry_service_and_its_worker(bento):
    info = yaml.safe_load((bento / "bento.yaml").read_text())
    assert info["service"] == "service:FluxInpainting"
    assert info["entry_service"] == "flux_inpaint"
    assert {s["name"] for s in info["services"]} == {"flux_inpaint", "flux_inpaint_worker"}
    assert "/fal-ai/flux-lora/inpainting" in info["schema"]["paths"]


def test_holds_the_server_code_and_nothing_else(bento):
    src = files(bento / "src")
    wanted = {"service.py"} | {
        str(p.relative_to(REPO))
        for d in ("runners", "export", "examples")
        for p in (REPO / d).rglob("*")
        if p.is_file() and p.suffix != ".pyc" and "__pycache__" not in p.parts
    }
    assert wanted <= src
    assert {"runners/front/playground/index.html", "runners/front/playground/main.js"} <= src  # the page at /
    assert src - wanted <= {"bentofile.yaml"}, f"unexpected files in the Bento: {sorted(src - wanted)}"
    assert not any(
        part in {"tests", ".venv", "benchmarks", "__pycache__", ".pytest_cache", "deploy"}
        for path in src
        for part in Path(path).parts
    )


def test_pins_the_lock_file(bento):
    requirements = (bento / "env/python/requirements.txt").read_text().split()
    lock = [line for line in (REPO / "requirements.lock").read_text().splitlines() if line and not line.startswith("#")]
    assert set(lock) <= set(requirements)
    assert "bentoml==1.4.39" in requirements


def test_image_base_and_environment(bento):
    dockerfile = (bento / "env/docker/Dockerfile").read_text()
    # No CUDA base image: torch's wheel brings CUDA 13 (bentofile.yaml says why).
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.M)
    envs = {e["name"]: e["value"] for e in yaml.safe_load((bento / "bento.yaml").read_text())["envs"]}
    assert envs["FLUX_MODEL"] == "tiny"
    assert envs["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    assert {name for name in envs if name.startswith("FLUX_")} <= setting_env_names()
    for name, value in envs.items():
        assert re.search(rf"^ENV {name}=", dockerfile, re.M) and value


def test_tensorrt_bento_installs_tensorrt_from_nvidias_index(bentos):
    bento = bentos["deploy/bentofile.tensorrt.yaml"]
    envs = {e["name"]: e["value"] for e in yaml.safe_load((bento / "bento.yaml").read_text())["envs"]}
    assert envs["FLUX_BACKEND"] == "tensorrt" and envs["FLUX_LORA_MAX_PER_REQUEST"] == "0"
    dockerfile = (bento / "env/docker/Dockerfile").read_text()
    (script,) = [p for p in (bento / "env/docker").glob("script__*")]
    assert script.name in dockerfile
    # run after the lock file's packages, so TensorRT joins the same environment
    assert dockerfile.index("pip install -r") < dockerfile.index(script.name)
    text = script.read_text()
    assert "--extra-index-url https://pypi.nvidia.com" in text
    assert re.search(r'"tensorrt-cu13==10\.[\d.]+"', text), "TensorRT 10, for torch's CUDA 13"


def test_every_module_imports_from_the_bento_alone(bento):
    """The Bento's own source tree, and nothing of the checkout, is enough to import each module:
    a subpackage missing from the bentofile's include fails here."""
    src = bento / "src"
    modules = sorted(
        ".".join(p.relative_to(src).with_suffix("").parts).removesuffix(".__init__")
        for p in src.rglob("*.py")
        if p.parts[len(src.parts)] in ("runners", "export", "service.py")
    )
    assert "runners.front.app" in modules and "runners.pipeline.inpaint" in modules
    script = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\nprint('imported', len(sys.argv) - 1)"
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script, *modules], cwd=src, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"imported {len(modules)}" in done.stdout
