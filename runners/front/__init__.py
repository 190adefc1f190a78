"""The HTTP front: fal's routes (``fal_http``), the OpenAPI document and the playground page at
``/`` (``playground``), the request queue (``queue``: one interface; ``life_cycle``: the one life
cycle behind it, over two transports, ``memory_queue`` in this process and ``redis_queue`` shared by
a fleet, with ``redis_codec``, ``redis_upkeep`` and ``redis_scripts``), job preparation (fetch, decode, LoRA files), the
executor over one ``ModelClient`` per model tier (``executor``: the BentoML worker;
``triton_client``: Triton), output stores (``store``: a directory; ``s3_store``: a bucket),
webhooks, metrics. ``app.Front`` is what service.py builds. Never imports torch, the pipeline, the
worker or the backends.
"""
