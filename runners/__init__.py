"""The server's code, one subpackage per tier (docs/architecture.md):

- ``protocol``: what crosses tiers (fal's schema, jobs and results, progress, the Triton tensors).
- ``front``: the HTTP process (fal routes, queue, job preparation, model clients, store, webhooks).
- ``worker``: the model process around the loop (batching, job board, ledger, the Triton server).
- ``pipeline``: the algorithm (the inpainting loop, acceleration, model loading, safety, test models).
- ``lora``: LoRA files (formats, sources) and adapters (per-sample deltas, fusing, cache).
- ``backends``: what runs the networks (interfaces, eager torch, ONNX Runtime, TensorRT, artifacts).

Shared by all: ``config`` (typed settings), ``errors`` (user-facing errors and their HTTP codes),
``logs``, ``lifecycle`` (SIGTERM drain), ``fetch`` (the SSRF-safe fetcher), ``metrics``.
The import rules between tiers are import-linter contracts in pyproject.toml, checked by
tests/test_layout.py.
"""
