"""The HTTP front: fal's routes (``fal_http``) and OpenAPI document, the request queue, job
preparation (fetch, decode, LoRA files), the executor over one ``ModelClient`` per model tier
(``executor``: the BentoML worker; ``triton_client``: Triton), output store, webhooks, metrics.
``app.Front`` is what service.py builds. Never imports torch, the pipeline, the worker or the backends.
"""
