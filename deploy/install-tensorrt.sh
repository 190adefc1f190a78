#!/usr/bin/env bash
# Run by `bentoml containerize` inside the image build of deploy/bentofile.tensorrt.yaml (its
# docker.setup_script), after the lock file's packages are installed into the image's /app/.venv.
# TensorRT 10 for CUDA 13, the CUDA of torch 2.13's PyPI wheel. The `tensorrt-cu13` on PyPI is a stub
# whose libraries come only from NVIDIA's index; best-match lets uv take each package from whichever
# index has the wanted version instead of stopping at the first index that knows the name.
set -euo pipefail
uv pip install --python /app/.venv/bin/python \
    --extra-index-url https://pypi.nvidia.com --index-strategy unsafe-best-match \
    "tensorrt-cu13==10.16.1.11"
/app/.venv/bin/python -c "import tensorrt; print('TensorRT', tensorrt.__version__)"
