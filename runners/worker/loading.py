"""The model as both model tiers (the BentoML worker, the Triton server) serve it: loaded, put on its
backend, and warmed up before the server reports ready.

Eager (``torch``) needs one small inference, so the first request pays no one-off cost. A compiled
transformer (``compile``) must also never compile inside a live request (on FLUX.1-dev a compile
takes seconds per graph regionally, minutes for the whole model): its graphs are symbolic in batch
size, image tokens and LoRA rank (runners/backends/compiled.py), and the warm-up runs each variant
dynamo still tells apart:

- one sample in a forward, and several (dynamo specialises a dimension of size 1);
- no LoRA (no delta layers at all), and LoRA deltas (padded to a rank bucket, on every layer);
- the first-block cache of ``acceleration: "regular"``: its first block on the whole batch and the
  remaining blocks on a sub-batch of one, and of several;
- the VAE (when compiled): encoding and decoding one image, and several.

``warmup_variants`` lists them; tests/test_compile.py then serves a traffic mix (batch sizes 1-4,
``num_images`` 1 and 2, two sizes, LoRAs of two ranks and none, "none" and "regular") under
``error_on_recompile``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from runners.pipeline.inpaint import Inpainter, InpaintInputs

log = logging.getLogger(__name__)

WARMUP_SIZE = 256  # pixels a side: 256 image tokens, small enough to cost little at FLUX's size
WARMUP_RANK = 16  # the LoRA rank of the warm-up's zero adapter (any rank: ranks are symbolic)


def load_inpainter(settings) -> Inpainter:
    """Load, attach the configured backend, warm up (``FLUX_WARMUP``). ``settings``: runners.config.Settings."""
    from runners.fetch import SafeFetcher
    from runners.pipeline.model import attach_backend, load_model

    model = load_model(settings.model, settings.lora, fetcher=SafeFetcher.for_settings(settings))
    attach_backend(model, settings)
    inpainter = Inpainter(model, settings.acceleration)
    if settings.model.warmup:
        warm_up(inpainter)
    return inpainter


def warm_up(inpainter: Inpainter) -> None:
    """One small inference through the adaptive runner; on a compiled transformer, then every variant
    of ``warmup_variants`` (the graphs a live request could otherwise compile)."""
    from PIL import Image

    from runners.protocol.images import encode_lossless
    from runners.protocol.jobs import InpaintJob
    from runners.protocol.schema import InpaintRequest
    from runners.worker import adaptive

    started = time.perf_counter()
    job = InpaintJob(
        request_id="warm-up",
        request=InpaintRequest(prompt="warm-up", image_url="-", mask_url="-", num_inference_steps=2),
        width=WARMUP_SIZE,
        height=WARMUP_SIZE,
        seed=0,
        image_png=encode_lossless(Image.new("RGB", (WARMUP_SIZE, WARMUP_SIZE), (127, 127, 127))),
        mask_png=encode_lossless(Image.new("L", (WARMUP_SIZE, WARMUP_SIZE), 255)),
    )
    if (result := adaptive.run_jobs(inpainter, [job])[0]).error is not None:
        raise RuntimeError(f"warm-up inference failed: {result.error.detail}")
    model = inpainter.model
    if model.backend == "compile":
        from runners.backends.compiled import graphs_compiled

        before = graphs_compiled()
        variants = warmup_variants(inpainter)
        fuse, model.fuse_uniform_loras = model.fuse_uniform_loras, False
        try:
            for variant in variants:
                variant.run()
        finally:
            model.fuse_uniform_loras = fuse
        log.info(
            "compiled warm-up: %d variant(s), %d graph(s) compiled",
            len(variants) + 1,
            graphs_compiled() - before,
        )
    log.info("warm-up done in %.2f s", time.perf_counter() - started)


@dataclass
class Variant:
    """One warm-up forward pattern: ``requests`` run as one group by ``inpainter``."""

    name: str
    inpainter: Inpainter
    requests: list[InpaintInputs]

    def run(self) -> None:
        started = time.perf_counter()
        self.inpainter.run(self.requests)
        log.debug("warm-up variant %s in %.2f s", self.name, time.perf_counter() - started)


def warmup_variants(inpainter: Inpainter) -> list[Variant]:
    """What a compiled transformer must have run before the first request (see the module's docstring)."""
    from PIL import Image

    model = inpainter.model
    image = Image.new("RGB", (WARMUP_SIZE, WARMUP_SIZE), (127, 127, 127))
    mask = Image.new("L", (WARMUP_SIZE, WARMUP_SIZE), 255)

    def request(steps: int = 2, num_images: int = 1, loras=(), acceleration: str = "none") -> InpaintInputs:
        return InpaintInputs(
            prompt="warm-up",
            image=image,
            mask=mask,
            width=WARMUP_SIZE,
            height=WARMUP_SIZE,
            seed=0,
            num_inference_steps=steps,
            strength=1.0,
            num_images=num_images,
            enable_safety_checker=False,
            loras=list(loras),
            acceleration=acceleration,
        )

    # The first-block cache made to skip whenever its rules allow, so a warm-up of a few steps runs
    # both its paths: the remaining blocks on the whole batch (a full step) and on a sub-batch.
    skipping = Inpainter(
        model,
        inpainter.acceleration.model_copy(update={"threshold": 1e9, "warmup_steps": 1, "max_consecutive_skips": 1}),
    )
    skipping.on_forward = None

    # Beside "regular" requests of 4 steps, "none" ones of 2: at step 1 the regular samples skip while
    # the none samples compute (a sub-batch of one, then of two); at step 2 the none samples are done
    # and the regular ones run in full.
    def fbcache(loras=()):
        return [
            Variant(
                "regular: sub-batch of 1", skipping, [request(loras=loras), request(steps=4, acceleration="regular")]
            ),
            Variant(
                "regular: sub-batch of 2",
                skipping,
                [request(loras=loras), request(), request(steps=4, acceleration="regular")],
            ),
        ]

    variants = [
        # two requests, one of them longer: a forward of two samples, then of one
        Variant("none: 2 requests", inpainter, [request(steps=2), request(steps=3)]),
        Variant("none: 1 request of 2 images", inpainter, [request(num_images=2)]),
    ]
    if inpainter.first_block_cache:
        variants += fbcache()
    if model.lora_layers is not None and model.adapters is not None:
        # Deltas, never fused (the warm-up turns fusing off): fused weights run the LoRA-free graph.
        zero = [(zero_adapter(model, WARMUP_RANK), 1.0)]
        variants += [
            Variant("LoRA: 1 request", inpainter, [request(loras=zero)]),
            Variant("LoRA and none: 2 requests", inpainter, [request(steps=3, loras=zero), request(steps=2)]),
        ]
        if inpainter.first_block_cache:
            variants += [
                Variant(
                    f"LoRA, {v.name}",
                    v.inpainter,
                    [*v.requests[:-1], request(steps=4, acceleration="regular", loras=zero)],
                )
                for v in fbcache(zero)
            ]
    return variants


def zero_adapter(model, rank: int):
    """An adapter of zeros on every LoRA layer: runs the LoRA graphs, changes no output."""
    import torch

    from runners.lora.adapters import Adapter
    from runners.lora.formats import LoraLayer

    layers = {}
    for name, module in model.lora_layers.items():
        weight = module.weight
        layers[name] = LoraLayer(
            down=torch.zeros(rank, module.in_features, device=weight.device, dtype=weight.dtype),
            up=torch.zeros(module.out_features, rank, device=weight.device, dtype=weight.dtype),
            multiplier=1.0,
        )
    return Adapter(sha256=f"warm-up-rank-{rank}", name="warm-up", layers=layers, format="warm-up")
