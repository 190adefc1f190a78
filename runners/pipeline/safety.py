"""The output safety checker: a CLIP classifier that flags images, which are then blacked out.

It is the CompVis ``StableDiffusionSafetyChecker`` (what diffusers' Stable Diffusion pipelines run),
loaded like the model: a hub id or a folder. The tiny model ships a tiny checker of the same
architecture, so the code path is the same in tests as in production.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


class SafetyChecker:
    def __init__(self, checker, feature_extractor, device, dtype):
        self.checker = checker
        self.feature_extractor = feature_extractor
        self.device = device
        self.dtype = dtype

    @classmethod
    def load(cls, source: str | Path, device, dtype) -> SafetyChecker:
        import torch
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        log.info("loading safety checker from %s", source)
        checker = StableDiffusionSafetyChecker.from_pretrained(
            str(source), torch_dtype=dtype, device_map=torch.device(device).type
        ).eval()
        feature_extractor = CLIPImageProcessor.from_pretrained(str(source))
        return cls(checker, feature_extractor, device, dtype)

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, list[bool]]:
        """``images``: (N, H, W, 3) floats in [0, 1]. Returns the images with flagged ones black, and the flags."""
        import torch
        from diffusers.image_processor import VaeImageProcessor

        pil_images = VaeImageProcessor.numpy_to_pil(images)
        clip_input = self.feature_extractor(pil_images, return_tensors="pt").pixel_values
        with torch.inference_mode():
            checked, flags = self.checker(clip_input=clip_input.to(self.device, self.dtype), images=images.copy())
        return np.asarray(checked, dtype=images.dtype), [bool(f) for f in flags]
