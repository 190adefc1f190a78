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
# ONNX Runtime with its CUDA provider, in place of the lock file's CPU-only onnxruntime (both install
# the same `onnxruntime` module): `python -m export --tensorrt` validates each graph on the GPU with
# it, and FLUX_BACKEND=onnxruntime refuses a CUDA model without it. 1.31.1 is the newest
# onnxruntime-gpu on PyPI and is built for CUDA 13 (its `cuda` and `cudnn` extras pin
# nvidia-cuda-runtime~=13.0 and nvidia-cudnn-cu13~=9.0, as torch 2.13 does).
uv pip uninstall --python /app/.venv/bin/python onnxruntime
uv pip install --python /app/.venv/bin/python "onnxruntime-gpu[cuda,cudnn]==1.31.1"
/app/.venv/bin/python -c "import onnxruntime as ort; assert 'CUDAExecutionProvider' in ort.get_available_providers(), ort.get_available_providers(); print('onnxruntime-gpu', ort.__version__)"
