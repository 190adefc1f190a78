"""The FLUX.1 inpainting loop, top to bottom, for one group of same-size requests.

It computes what diffusers' ``FluxInpaintPipeline`` computes (tests/test_loop.py,
``test_matches_diffusers_flux_inpaint_pipeline``, holds it to that), reorganised around per-sample
state: every image being denoised is a ``Sample`` that carries its own prompt embeddings, guidance, mask, noise, sigma schedule and step counter. A denoising step
stacks whatever samples are still active into one transformer batch and advances each by its own
sigmas. Requests with different step counts or strengths therefore share a batch, and one request
can leave it at any step boundary (cancelled, or past its deadline) without disturbing the others; the same state
is what lets a request join a running batch at a step boundary: ``Inpainter.run`` is the whole loop
for one fixed group (the adaptive path), while the step engine (runners/worker/engine.py) calls its
pieces, ``prepare``, ``step`` and ``decode``, itself.

Steps:
 1. encode prompts (CLIP pooled + T5 sequence), once per distinct prompt;
 2. encode image (VAE, one posterior sample per image) and mask (binarised, latent-resolution);
 3. plan each sample's flow-match schedule, cut by ``strength`` exactly as diffusers does;
 4. noise the image latents to the first sigma;
 5. per step: transformer over the packed latents (for ``acceleration: "regular"`` samples, with
    the first-block cache of runners/pipeline/acceleration.py), Euler update, then put back the known region
    re-noised to the next sigma from the original latents;
 6. decode, safety-check, hand back PIL images.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from runners.config import AccelerationSettings
from runners.pipeline import acceleration
from runners.pipeline.acceleration import FirstBlockCache
from runners.pipeline.host_reads import DeviceConstants
from runners.pipeline.model import FluxModel

log = logging.getLogger(__name__)

StepCallback = Callable[[int, int, int], None]  # (request index in group, step done, steps total)
CancelCheck = Callable[[int], bool]  # request index in group -> stop it now?
ForwardCallback = Callable[[int, float], None]  # (samples in the forward, seconds of the step)


@dataclass
class InpaintInputs:
    """One request as the loop sees it: validated values, decoded images, no HTTP."""

    prompt: str
    image: Image.Image  # RGB, any size: resized to (width, height)
    mask: Image.Image  # L, white = repaint, any size: resized to (width, height)
    width: int  # multiples of 16
    height: int
    seed: int  # image i of this request uses seed + i
    num_inference_steps: int = 28
    strength: float = 0.85
    guidance_scale: float = 3.5
    num_images: int = 1
    enable_safety_checker: bool = True
    loras: list = field(default_factory=list)  # runners.lora.adapters.RequestLoras: (Adapter, scale) pairs
    acceleration: str = "none"  # "regular": first-block cache and TF32 where this server has them


@dataclass
class InpaintResult:
    images: list[Image.Image]
    has_nsfw_concepts: list[bool]
    timings: dict[str, float] = field(default_factory=dict)
    cancelled: bool = False  # stopped at a step boundary; no images
    steps_skipped: int = 0  # transformer steps the first-block cache skipped, over this request's images


@dataclass
class Sample:
    """One image being denoised, with everything that may differ from the other samples."""

    row: int  # its request's row in the LoRA scales: the request's index in the group (or among the engine's requests)
    prompt_embeds: torch.Tensor  # (text_tokens, joint_dim)
    pooled_prompt_embeds: torch.Tensor  # (pooled_dim,)
    guidance: torch.Tensor  # () float32, on the device
    image_latents: torch.Tensor  # (image_tokens, 64) packed, the known image
    noise: torch.Tensor  # (image_tokens, 64) packed, this sample's noise
    mask: torch.Tensor  # (image_tokens, 64) packed, 1 = repaint
    timesteps: torch.Tensor  # (n,) float32 on the device: this sample's schedule after strength, in [0, 1000]
    sigmas: torch.Tensor  # (n + 1,) float32 on the device: matching sigmas, ending in 0
    latents: torch.Tensor  # (image_tokens, 64) packed, the current state
    step: int = 0
    cancelled: bool = False
    accelerated: bool = False  # asked for acceleration "regular"
    first_block_cache: FirstBlockCache | None = None  # None: every step runs the whole transformer

    @property
    def done(self) -> bool:
        return self.cancelled or self.step >= len(self.timesteps)


def plan_schedule(scheduler_config, num_inference_steps: int, strength: float, image_seq_len: int):
    """(timesteps, sigmas) for one sample, as FluxInpaintPipeline computes them: FLUX's sigmas
    1..1/N shifted by ``mu`` for the image size, then cut by diffusers' ``get_timesteps``, which
    skips ``int(N - N * strength)`` steps: 24 of 28 run at strength 0.85 (not int(28 * 0.85) = 23)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux_inpaint import calculate_shift, retrieve_timesteps

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    mu = calculate_shift(
        image_seq_len,
        scheduler.config.get("base_image_seq_len", 256),
        scheduler.config.get("max_image_seq_len", 4096),
        scheduler.config.get("base_shift", 0.5),
        scheduler.config.get("max_shift", 1.15),
    )
    sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    retrieve_timesteps(scheduler, num_inference_steps, "cpu", sigmas=sigmas, mu=mu)
    init_timestep = min(num_inference_steps * strength, num_inference_steps)
    t_start = int(max(num_inference_steps - init_timestep, 0))
    return scheduler.timesteps[t_start:].float(), scheduler.sigmas[t_start:].float()


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, C * 4): FLUX's 2x2 patch tokens."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of ``pack`` for latent height ``h`` and width ``w``."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


class Inpainter:
    """Runs the loop for one group of requests that share an output size."""

    def __init__(self, model: FluxModel, settings: AccelerationSettings | None = None):
        self.model = model
        self.pipe = model.pipeline
        self.acceleration = settings or AccelerationSettings()
        self.first_block_cache = self.acceleration.first_block_cache and getattr(model.transformer, "splittable", False)
        # TF32 changes only fp32 matmuls on CUDA; elsewhere flipping the flag would only make a
        # compiled transformer recompile (dynamo guards on it).
        self.tf32 = self.acceleration.tf32 and model.device.type == "cuda" and model.dtype == torch.float32
        self.on_forward: ForwardCallback | None = None  # the worker's metrics: samples per forward
        self.constants = DeviceConstants()  # position ids per size, index tensors: made once on the device
        log.info(
            acceleration.describe(
                self.acceleration, getattr(model.transformer, "splittable", False), model.backend, self.tf32
            )
        )

    @torch.inference_mode()
    def run(
        self,
        requests: list[InpaintInputs],
        on_step: StepCallback | None = None,
        is_cancelled: CancelCheck | None = None,
    ) -> list[InpaintResult]:
        width, height = requests[0].width, requests[0].height
        if any((r.width, r.height) != (width, height) for r in requests):
            raise ValueError("a group must share one output size")
        started = time.perf_counter()
        samples = self.prepare(requests, width, height)
        prepared = time.perf_counter()
        with self.loras_applied([r.loras for r in requests]):
            self.denoise(samples, width, height, on_step, is_cancelled)
        denoised = time.perf_counter()
        finished_samples = [s for s in samples if not s.cancelled]
        safety = [requests[s.row].enable_safety_checker for s in finished_samples]
        images, flags = self.decode(finished_samples, width, height, safety) if finished_samples else ([], [])
        finished = time.perf_counter()
        timings = {"preprocess": prepared - started, "inference": denoised - prepared, "decode": finished - denoised}
        results = []
        for r in range(len(requests)):
            mine = [i for i, s in enumerate(finished_samples) if s.row == r]
            cancelled = any(s.cancelled for s in samples if s.row == r)
            results.append(
                InpaintResult(
                    images=[] if cancelled else [images[i] for i in mine],
                    has_nsfw_concepts=[] if cancelled else [flags[i] for i in mine],
                    timings=dict(timings),
                    cancelled=cancelled,
                    steps_skipped=sum(
                        s.first_block_cache.skipped for s in samples if s.row == r and s.first_block_cache is not None
                    ),
                )
            )
            if results[-1].steps_skipped:
                log.info(
                    "request %d of the group: first-block cache skipped %d of %d transformer steps",
                    r,
                    results[-1].steps_skipped,
                    sum(s.step for s in samples if s.row == r),
                )
        return results

    @contextlib.contextmanager
    def loras_applied(self, per_request: list) -> Iterator[None]:
        """The group's LoRAs on the transformer for the denoising loop, and off again after, whatever
        happens: per-sample deltas, or, when every request uses one LoRA set and the model is set to
        fuse such batches (float32 only: ``load_model`` says why), fused into the weights and the
        originals copied back bit for bit. A group without LoRAs runs with no delta layer at all:
        it costs what it would on a server with LoRAs off."""
        from runners.lora import adapters as lora

        layers, pad_to = self.model.lora_layers, self.model.lora_rank_buckets
        if layers is None or not any(per_request):
            yield
            return
        first = [(id(a), s) for a, s in per_request[0]]
        uniform = all([(id(a), s) for a, s in r] == first for r in per_request)
        if self.model.fuse_uniform_loras and uniform and first and lora.fuse_fits(layers, per_request[0]):
            fused = lora.fuse(layers, per_request[0], keep_originals=True)
            try:
                yield
            finally:
                lora.unfuse(layers, fused)
            return
        lora.activate(layers, per_request, pad_to=pad_to, device=self.model.device, dtype=self.model.dtype)
        try:
            yield
        finally:
            lora.deactivate(layers)

    # 1-4: everything before the first step
    def prepare(self, requests: list[InpaintInputs], width: int, height: int) -> list[Sample]:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
        from diffusers.utils.torch_utils import randn_tensor

        model, vae = self.model, self.model.vae
        device, dtype = model.device, model.dtype
        latent_h, latent_w = height // vae.scale_factor, width // vae.scale_factor

        # 1. prompts: one text-encoder batch over the distinct prompts of the group
        prompts = list(dict.fromkeys(r.prompt for r in requests))
        prompt_embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=device, max_sequence_length=model.max_sequence_length
        )
        by_prompt = {p: i for i, p in enumerate(prompts)}

        # 2. images through the VAE encoder, FLUX_VAE_BATCH_IMAGES at a time; masks binarised at
        # latent resolution
        pixels = torch.cat(
            [self.pipe.image_processor.preprocess(r.image, height=height, width=width) for r in requests]
        )
        moments = torch.cat(
            [
                vae.encode(pixels[chunk].to(device=device, dtype=dtype))
                for chunk in vae_chunks(len(requests), model.vae_batch_images)
            ]
        )
        masks = torch.cat([self.pipe.mask_processor.preprocess(r.mask, height=height, width=width) for r in requests])
        masks = torch.nn.functional.interpolate(masks, size=(latent_h, latent_w)).to(device=device, dtype=dtype)
        masks = pack(masks.repeat(1, vae.latent_channels, 1, 1))

        samples = []
        for index, request in enumerate(requests):
            # 3. this request's schedule (samples of one request share it)
            timesteps, sigmas = plan_schedule(
                self.pipe.scheduler.config,
                request.num_inference_steps,
                request.strength,
                (latent_h // 2) * (latent_w // 2),
            )
            # On the device from here on, with the guidance: a step then reads nothing from the host
            # (runners/pipeline/host_reads.py says why that matters on a GPU).
            timesteps, sigmas = timesteps.to(device), sigmas.to(device)
            guidance = torch.tensor(request.guidance_scale, device=device, dtype=torch.float32)
            posterior = DiagonalGaussianDistribution(moments[index : index + 1])
            for image_index in range(request.num_images):
                # One generator per image, drawn in diffusers' order (posterior sample, then noise),
                # so an image depends on its own seed only, never on what it was batched with.
                generator = torch.Generator(device="cpu").manual_seed(request.seed + image_index)
                image_latents = (posterior.sample(generator) - vae.shift_factor) * vae.scaling_factor
                noise = randn_tensor(image_latents.shape, generator=generator, device=device, dtype=dtype)
                # 4. the image noised to this schedule's first sigma
                sigma = sigmas[0].to(dtype)
                latents = sigma * noise + (1.0 - sigma) * image_latents
                samples.append(
                    Sample(
                        row=index,
                        prompt_embeds=prompt_embeds[by_prompt[request.prompt]],
                        pooled_prompt_embeds=pooled[by_prompt[request.prompt]],
                        guidance=guidance,
                        image_latents=pack(image_latents)[0],
                        noise=pack(noise)[0],
                        mask=masks[index],
                        timesteps=timesteps,
                        sigmas=sigmas,
                        latents=pack(latents)[0],
                        accelerated=request.acceleration == "regular",
                        first_block_cache=FirstBlockCache()
                        if request.acceleration == "regular" and self.first_block_cache
                        else None,
                    )
                )
        return samples

    # 5. the denoising loop over whichever samples are still active
    def denoise(
        self,
        samples: list[Sample],
        width: int,
        height: int,
        on_step: StepCallback | None = None,
        is_cancelled: CancelCheck | None = None,
    ) -> None:
        while True:
            if is_cancelled is not None:  # a cancelled request leaves the batch at this step boundary
                for s in samples:
                    s.cancelled = s.cancelled or (not s.done and is_cancelled(s.row))
            active = [s for s in samples if not s.done]
            if not active:
                break
            self.step(active, width, height)
            if on_step is not None:
                for s in {s.row: s for s in active}.values():
                    on_step(s.row, s.step, len(s.timesteps))

    def step(self, active: list[Sample], width: int, height: int) -> None:
        """One denoising step of every sample given (all of one output size, none done): one
        transformer forward over them, then each advances by its own sigmas. The step engine
        (runners/worker/engine.py) calls this directly, with whichever samples are running.

        Everything it reads is on the device already (schedules and guidance since ``prepare``,
        positions and LoRA row indices made once and kept): a step of ``"none"`` samples makes no
        host-device transfer at all, and the first-block cache makes one read (acceleration.py says
        why). tests/test_host_reads.py holds both counts."""
        model = self.model
        dtype = model.dtype
        started = time.perf_counter()
        img_ids, txt_ids = self.positions(width, height, active[0].prompt_embeds.shape[0])
        self.use_lora_rows(active)
        latents = torch.stack([s.latents for s in active])
        timestep = torch.stack([s.timesteps[s.step] for s in active]).to(dtype)
        guidance = torch.stack([s.guidance for s in active]) if model.transformer.guidance_embeds else None
        inputs = dict(
            hidden_states=latents,
            encoder_hidden_states=torch.stack([s.prompt_embeds for s in active]),
            pooled_projections=torch.stack([s.pooled_prompt_embeds for s in active]),
            timestep=timestep / 1000,
            guidance=guidance,
            img_ids=img_ids,
            txt_ids=txt_ids,
        )
        # Lower-precision matmuls only when every sample of this forward asked for them.
        with acceleration.reduced_precision_matmuls(self.tf32 and all(s.accelerated for s in active)):
            if any(s.first_block_cache is not None for s in active):
                velocity = acceleration.cached_forward(
                    model.transformer, inputs, active, self.acceleration, self.use_lora_rows, self.indices
                )
            else:
                velocity = model.transformer(**inputs)
        # Euler step as FlowMatchEulerDiscreteScheduler.step does it: the velocity times the
        # sigma difference in the model's dtype, added to the latents in float32.
        sigma = torch.stack([s.sigmas[s.step] for s in active]).view(-1, 1, 1)
        sigma_next = torch.stack([s.sigmas[s.step + 1] for s in active]).view(-1, 1, 1)
        delta = ((sigma_next - sigma) * velocity).to(velocity.dtype)
        stepped = (latents.float() + delta).to(velocity.dtype)
        # The known region: the original latents re-noised to the next sigma. After the last step
        # that sigma is 0, which gives the clean latents exactly (0 * noise + 1 * latents).
        next_sigma = sigma_next.to(dtype)
        image_latents = torch.stack([s.image_latents for s in active])
        known = next_sigma * torch.stack([s.noise for s in active]) + (1.0 - next_sigma) * image_latents
        mask = torch.stack([s.mask for s in active])
        for s, new in zip(active, (1 - mask) * known + mask * stepped):
            s.latents = new
            s.step += 1
        if self.on_forward is not None:
            self.on_forward(len(active), time.perf_counter() - started)

    def positions(self, width: int, height: int, text_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """FLUX's (row, column) position ids of the image tokens, and the text tokens' (all 0), for
        one output size: what diffusers' ``_prepare_latent_image_ids`` computes, made once per size
        on the device."""

        def make():
            side = self.model.vae.scale_factor * 2  # pixels per packed token side
            rows, columns = height // side, width // side
            ids = torch.zeros(rows, columns, 3)
            ids[..., 1] = torch.arange(rows)[:, None]
            ids[..., 2] = torch.arange(columns)[None, :]
            device, dtype = self.model.device, self.model.dtype
            return ids.reshape(rows * columns, 3).to(device=device, dtype=dtype), torch.zeros(
                text_tokens, 3, device=device, dtype=dtype
            )

        return self.constants.get(("positions", width, height, text_tokens), make)

    def indices(self, values: tuple[int, ...]) -> torch.Tensor:
        """``values`` as an index tensor on the device, made once per distinct tuple."""
        return self.constants.get(("index", values), lambda: torch.tensor(values, device=self.model.device))

    def use_lora_rows(self, batch: list[Sample]) -> None:
        """Point per-request LoRA scales at the requests of the next forward's samples, row by row."""
        if self.model.lora_layers is not None:
            from runners.lora.adapters import set_rows

            set_rows(self.model.lora_layers, self.indices(tuple(s.row for s in batch)))

    # 6. latents to checked PIL images
    def decode(self, samples: list[Sample], width: int, height: int, check_safety: list[bool]):
        """PIL images and NSFW flags of ``samples``; ``check_safety``: per sample, run the checker?
        The VAE decodes FLUX_VAE_BATCH_IMAGES at a time (one by default): a group of 16 images at
        1024x1024 in one call would need tens of GB of activations, and in bf16 an image would
        depend on its batch-mates."""
        vae = self.model.vae
        latents = unpack(
            torch.stack([s.latents for s in samples]), height // vae.scale_factor, width // vae.scale_factor
        )
        images = np.concatenate(
            [
                self.pipe.image_processor.postprocess(
                    vae.decode(latents[chunk] / vae.scaling_factor + vae.shift_factor), output_type="np"
                )
                for chunk in vae_chunks(len(samples), self.model.vae_batch_images)
            ]
        )
        flags = [False] * len(samples)
        checker = self.model.safety_checker
        to_check = [i for i, check in enumerate(check_safety) if check]
        if checker is not None and to_check:
            checked, checked_flags = checker(images[to_check])
            for j, i in enumerate(to_check):
                images[i], flags[i] = checked[j], checked_flags[j]
        return self.pipe.image_processor.numpy_to_pil(images), flags


def vae_chunks(count: int, per_chunk: int) -> list[slice]:
    """``count`` images as consecutive slices of at most ``per_chunk``."""
    return [slice(start, min(start + per_chunk, count)) for start in range(0, count, per_chunk)]
