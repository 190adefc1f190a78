"""The exported ONNX graphs behind the loop's two interfaces, run by ONNX Runtime.

CUDA when onnxruntime-gpu provides it, else the CPU. Tensors cross as numpy arrays in float32 (the
dtype the graphs were exported in); the loop gets torch tensors back in its own device and dtype.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


class OnnxSession:
    def __init__(self, path: Path):
        import onnxruntime as ort

        wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        providers = [p for p in wanted if p in ort.get_available_providers()]
        options = ort.SessionOptions()
        options.log_severity_level = 3  # warnings about unused initialisers are noise here
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        log.info("ONNX Runtime session for %s on %s", path.name, self.session.get_providers()[0])

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        feed = {name: inputs[name].detach().to("cpu", torch.float32).numpy() for name in self.input_names}
        (output,) = self.session.run(None, feed)
        return torch.from_numpy(np.ascontiguousarray(output))


class OnnxTransformer:
    def __init__(self, path: Path, config, device, dtype):
        self.session = OnnxSession(path)
        self.in_channels = config.in_channels
        self.guidance_embeds = bool(config.guidance_embeds)
        self.device, self.dtype = device, dtype

    def __call__(
        self, *, hidden_states, encoder_hidden_states, pooled_projections, timestep, guidance, img_ids, txt_ids
    ):
        inputs = dict(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            timestep=timestep,
            img_ids=img_ids,
            txt_ids=txt_ids,
        )
        if guidance is not None:
            inputs["guidance"] = guidance
        return self.session(**inputs).to(self.device, self.dtype)


class OnnxVae:
    def __init__(self, encoder: Path, decoder: Path, torch_vae, device, dtype):
        self.encoder, self.decoder = OnnxSession(encoder), OnnxSession(decoder)
        self.latent_channels = torch_vae.latent_channels
        self.scale_factor = torch_vae.scale_factor
        self.scaling_factor = torch_vae.scaling_factor
        self.shift_factor = torch_vae.shift_factor
        self.device, self.dtype = device, dtype

    def encode(self, images):
        return self.encoder(images=images).to(self.device, self.dtype)

    def decode(self, latents):
        return self.decoder(latents=latents).to(self.device, self.dtype)
