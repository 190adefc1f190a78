"""What runs the networks behind the loop: ``interfaces`` (the transformer and VAE protocols),
``eager`` (the diffusers modules themselves), ``onnx_runtime``, ``tensorrt_engine``, and
``artifacts`` (content-addressed exports: the keys `python -m export` writes under and the server
looks up). Imports no other tier but ``config``.
"""
