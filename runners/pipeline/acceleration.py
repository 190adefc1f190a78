"""``acceleration: "regular"``: a faster transformer step with slightly lower fidelity.

First-block residual cache (FBCache: ParaAttention's variant of AdaCache and TeaCache). Why it
works: from one denoising step to the next, what the 57 blocks of FLUX add to the image stream
changes slowly, and how much it changes is mirrored by how much the *first* block's contribution
changes. So every step runs the embeddings and the first block; for each sample it compares that
block's residual with the one from the sample's last full step,

    change = mean |r_now - r_then| / mean |r_then|,

and when ``change`` is under the threshold it adds the residual the remaining blocks produced then
(``rest_residual``) instead of running them. The reference stays at the last *full* step, so drift
across skipped steps accumulates until a full step is forced; ``max_consecutive_skips``, the warm-up
steps and the last step (always full: it lands on the clean image) bound the rest.

Everything is per sample, because one batch holds samples with different schedules and requests
that asked for ``"none"``: a ``"none"`` sample has no cache and is never skipped, and the samples
that must compute run the remaining blocks as a sub-batch of just them (gather, run, scatter), so
a skipping sample costs only the first block. Per-request LoRA deltas index their scales by batch
row, so the sub-batch gets its own rows (``use_rows``) and the full batch gets them back after.

Lower-precision matmuls: TF32 for fp32 matmuls on CUDA is a process-wide flag, so it is set only
around a step whose samples are all ``"regular"``; a step with any ``"none"`` sample runs in full
precision. It is left alone for bf16 and fp16 weights (already on tensor cores; the flag would
change nothing) and on the CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from runners.backends.interfaces import SplitTransformerBackend
    from runners.config import AccelerationSettings


@dataclass
class FirstBlockCache:
    """One sample's cache, from its last full transformer step."""

    first_residual: torch.Tensor | None = None  # (image_tokens, dim) what the first block added then
    rest_residual: torch.Tensor | None = None  # (image_tokens, dim) what the remaining blocks added then
    skips_in_a_row: int = 0
    skipped: int = 0  # steps this sample skipped, in all


class CachedSample(Protocol):
    """What the cache needs of a runners.pipeline.inpaint.Sample."""

    first_block_cache: FirstBlockCache | None  # None: "none", never skipped
    step: int
    timesteps: torch.Tensor


def may_skip(sample: CachedSample, settings: AccelerationSettings) -> bool:
    cache = sample.first_block_cache
    return (
        cache is not None
        and cache.rest_residual is not None
        and sample.step >= settings.warmup_steps
        and sample.step < len(sample.timesteps) - 1  # the last step lands on the clean image: always full
        and cache.skips_in_a_row < settings.max_consecutive_skips
    )


def relative_changes(now: torch.Tensor, then: torch.Tensor) -> list[float]:
    """Per sample, mean |now - then| / mean |then| over tokens and channels, in float32.

    The one host read of a cached step, and it must stay: which samples run the remaining blocks
    decides the shape of the sub-batch that runs them, and shapes are chosen on the host. It waits
    for the first block only (the rest of the step is queued after it); a step with no sample past
    its warm-up makes no read at all."""
    now, then = now.float(), then.float()
    return ((now - then).abs().mean(dim=(1, 2)) / then.abs().mean(dim=(1, 2))).tolist()


def cached_forward(
    transformer: SplitTransformerBackend,
    inputs: dict,
    samples: list[CachedSample],
    settings: AccelerationSettings,
    use_rows: Callable[[list], None],
    indices: Callable[[tuple[int, ...]], torch.Tensor],
) -> torch.Tensor:
    """The transformer's velocity for ``samples`` (the batch ``inputs`` was stacked from), running
    the remaining blocks only for samples whose first-block residual moved. ``use_rows(subset)``
    points per-request LoRA scales at the samples of the next forward; ``indices(rows)`` gives
    ``rows`` as an index tensor on the device (made once and kept, so no copy per step)."""
    first = transformer.first_block(**inputs)
    skip = [False] * len(samples)
    candidates = [i for i, s in enumerate(samples) if may_skip(s, settings)]
    if candidates:
        then = torch.stack([samples[i].first_block_cache.first_residual for i in candidates])
        changes = relative_changes(first.residual[indices(tuple(candidates))], then)
        for i, change in zip(candidates, changes):
            skip[i] = change < settings.threshold
    compute = [i for i in range(len(samples)) if not skip[i]]
    if len(compute) == len(samples):
        hidden = transformer.remaining_blocks(first)
    else:
        hidden = first.hidden_states.clone()  # skipped rows are filled from their caches below
        if compute:
            index = indices(tuple(compute))
            use_rows([samples[i] for i in compute])
            try:
                hidden[index] = transformer.remaining_blocks(first, index)
            finally:
                use_rows(samples)  # norm_out and proj_out run over the whole batch
    for i, sample in enumerate(samples):
        cache = sample.first_block_cache
        if cache is None:
            continue
        if skip[i]:
            hidden[i] = first.hidden_states[i] + cache.rest_residual
            cache.skips_in_a_row += 1
            cache.skipped += 1
        else:
            cache.first_residual = first.residual[i].clone()
            cache.rest_residual = hidden[i] - first.hidden_states[i]
            cache.skips_in_a_row = 0
    return transformer.output(hidden, first.temb)


@contextlib.contextmanager
def reduced_precision_matmuls(enabled: bool) -> Iterator[None]:
    """TF32 for fp32 matmuls inside the block, the previous setting restored after."""
    if not enabled:
        yield
        return
    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        matmul.fp32_precision = previous


def describe(settings: AccelerationSettings, splittable: bool, backend: str, tf32: bool) -> str:
    """The start-up line saying what ``acceleration: "regular"`` does on this server."""
    parts = []
    if settings.first_block_cache and splittable:
        parts.append(
            f"first-block cache (threshold {settings.threshold:g}, warm-up {settings.warmup_steps} step(s), "
            f"at most {settings.max_consecutive_skips} skipped in a row)"
        )
    elif settings.first_block_cache:
        parts.append(
            f"no first-block cache, as backend {backend} runs the transformer as one graph "
            '(requests asking for "regular" run the full model, as "none")'
        )
    if tf32:
        parts.append("TF32 matmuls")
    elif settings.tf32:
        parts.append("no TF32 (it changes only fp32 matmuls on CUDA)")
    what = ", ".join(parts) if parts else 'nothing: every switch is off, it runs as "none"'
    return f'acceleration "regular": {what}'
