"""The exported ONNX graphs behind the loop's two interfaces, run by ONNX Runtime.

The session runs on the provider of the device the model is on: the CUDA provider for a CUDA model
(``onnxruntime-gpu``), the CPU provider for a CPU model. A CUDA model with an onnxruntime that has no
CUDA provider is refused at start, naming the package: ONNX Runtime would otherwise put every step
on the CPU without a word.

Tensors cross through IO binding: each input is bound where it already is (made float32, the
graphs' dtype, on the model's device), and the output is written by ONNX Runtime straight into a
torch tensor allocated on that device. A step's tensors never leave the GPU, and on the CPU nothing
goes through numpy copies either. The loop gets the output back in its own dtype.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

CUDA_PACKAGE = "onnxruntime-gpu"
CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


def session_providers(device: torch.device) -> list:
    """The execution providers for a model on ``device``, or a RuntimeError saying what to install."""
    import onnxruntime as ort

    device = torch.device(device)
    available = ort.get_available_providers()
    if device.type == "cuda":
        if CUDA_PROVIDER not in available:
            raise RuntimeError(
                f"FLUX_BACKEND=onnxruntime with the model on {device}: this onnxruntime ({ort.__version__}) has no "
                f"CUDA provider (it has {', '.join(available)}), so every step would run on the CPU. Install "
                f"{CUDA_PACKAGE} in its place (pip uninstall -y onnxruntime && pip install {CUDA_PACKAGE}; the TensorRT "
                "image has it), or serve with FLUX_BACKEND=torch, compile or tensorrt"
            )
        index = device.index if device.index is not None else torch.cuda.current_device()
        # The CPU provider stays as the fallback ONNX Runtime needs for the few shape ops CUDA lacks.
        return [(CUDA_PROVIDER, {"device_id": index}), CPU_PROVIDER]
    if device.type != "cpu":
        raise RuntimeError(f"FLUX_BACKEND=onnxruntime runs models on cpu or cuda, not {device.type}")
    return [CPU_PROVIDER]


def create_session(path: Path, device: torch.device, *, prepack: bool = True):
    """An ``InferenceSession`` for ``path`` on ``device``'s provider; refused if CUDA was asked for and
    the session did not get it (e.g. CUDA libraries that onnxruntime-gpu could not load).

    ``prepack=False``: the CPU provider reads the weights straight from the memory-mapped external
    data file (file-backed pages the kernel can drop) instead of packing its own copies in anonymous
    memory; slower matmuls, so only for a session that runs once (the export's validation)."""
    import onnxruntime as ort

    providers = session_providers(device)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initialisers are noise here
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    if torch.device(device).type == "cuda" and CUDA_PROVIDER not in session.get_providers():
        raise RuntimeError(
            f"ONNX Runtime could not start its CUDA provider for {Path(path).name} (session providers "
            f"{session.get_providers()}): check that {CUDA_PACKAGE}'s CUDA and cuDNN libraries match this machine"
        )
    return session


class OnnxSession:
    """One graph with one float32 output, run through IO binding on ``device``."""

    def __init__(self, path: Path, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.session = create_session(path, self.device)
        self.input_names = [i.name for i in self.session.get_inputs()]
        (self.output_name,) = [o.name for o in self.session.get_outputs()]
        log.info("ONNX Runtime session for %s on %s", Path(path).name, self.session.get_providers()[0])

    def __call__(self, output_shape: tuple[int, ...], **inputs: torch.Tensor) -> torch.Tensor:
        """The output (``output_shape``, float32, on the device) for ``inputs`` (torch tensors)."""
        binding = self.session.io_binding()
        kind, index = self.device.type, self.device.index or 0
        feeds = []  # referenced until the run is over: ONNX Runtime reads their memory
        for name in self.input_names:
            tensor = inputs[name].detach().to(device=self.device, dtype=torch.float32).contiguous()
            feeds.append(tensor)
            binding.bind_input(name, kind, index, np.float32, tuple(tensor.shape), tensor.data_ptr())
        output = torch.empty(output_shape, dtype=torch.float32, device=self.device)
        binding.bind_output(self.output_name, kind, index, np.float32, tuple(output.shape), output.data_ptr())
        if kind == "cuda":
            # The inputs were made on torch's stream; ONNX Runtime runs on its own.
            torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)
        del feeds
        return output


class OnnxTransformer:
    def __init__(self, path: Path, config, device, dtype, session: Callable[..., OnnxSession] = OnnxSession):
        self.session = session(path, device)
        self.in_channels = config.in_channels
        self.guidance_embeds = bool(config.guidance_embeds)
        self.device, self.dtype = self.session.device, dtype

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
        velocity = self.session(tuple(hidden_states.shape), **inputs)
        return velocity.to(self.dtype)


class OnnxVae:
    def __init__(self, encoder: Path, decoder: Path, torch_vae, device, dtype, session=OnnxSession):
        self.encoder, self.decoder = session(encoder, device), session(decoder, device)
        self.latent_channels = torch_vae.latent_channels
        self.scale_factor = torch_vae.scale_factor
        self.scaling_factor = torch_vae.scaling_factor
        self.shift_factor = torch_vae.shift_factor
        self.device, self.dtype = self.encoder.device, dtype

    def encode(self, images):
        batch, _, height, width = images.shape
        shape = (batch, 2 * self.latent_channels, height // self.scale_factor, width // self.scale_factor)
        return self.encoder(shape, images=images).to(self.dtype)

    def decode(self, latents):
        batch, _, height, width = latents.shape
        return self.decoder((batch, 3, height * self.scale_factor, width * self.scale_factor), latents=latents).to(
            self.dtype
        )
