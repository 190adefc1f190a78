"""LoRAs: ``formats`` reads untrusted files (diffusers, kohya, XLabs) into checked layers,
``adapters`` applies them (per-sample deltas, fusing, the adapter cache), and ``sources`` resolves
a request's path (local directory, URL, hub) to a cached file. ``sources`` is the front's and
imports no torch; ``formats`` and ``adapters`` are the model's.
"""
