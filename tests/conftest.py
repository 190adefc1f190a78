"""Shared fixtures: one tiny model on disk and in memory for the whole session."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Nothing in the suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("flux-cache")


@pytest.fixture(scope="session")
def tiny_dir(cache_dir) -> Path:
    from runners.tiny import ensure_tiny_model

    return ensure_tiny_model(cache_dir)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    """The tiny model loaded through the real loader, from its folder (FLUX_MODEL=<folder>)."""
    from runners.config import ModelSettings
    from runners.model import load_model

    return load_model(ModelSettings(model=str(tiny_dir), max_sequence_length=32, safety_checker=str(tiny_dir / "safety_checker")))


@pytest.fixture(scope="session")
def inpainter(tiny_model):
    from runners.inpaint import Inpainter

    return Inpainter(tiny_model)


def scene(width: int = 64, height: int = 48, seed: int = 0) -> tuple[Image.Image, Image.Image]:
    """A random RGB image and a mask repainting a rectangle in its middle."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    return image, mask


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)
