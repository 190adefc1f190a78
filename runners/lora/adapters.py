"""LoRAs at run time: adapters kept in memory, applied as per-sample low-rank deltas, or fused.

A LoRA changes a linear layer to ``W + sum_i scale_i * (alpha_i / r_i) * B_i A_i``. Per-request LoRAs
never touch ``W``: the transformer's own ``nn.Linear`` modules become ``LoraLinear`` (a class swap,
so parameter names and state dicts stay as they are) and add ``B (s * (A x))`` on the fly. For a
batch, the adapters of all its requests are concatenated along the rank dimension, and a per-request
scale for every rank row selects each sample's own adapters (zero elsewhere): two extra matmuls per
layer however many LoRAs the batch mixes, and requests with different LoRA sets share one batch.
For a compiled transformer, ``pad_to`` (its rank buckets) gives every layer deltas of one width,
the smallest bucket that holds the batch's rank (zero rows), and a batch without LoRAs no deltas at
all (docs/compile.md). Fusing (``fuse``) is for LoRAs configured at start-up, and for
a batch whose requests all use one LoRA set, with the base weights restored bit for bit after.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from runners.lora.formats import LoraError, LoraLayer, load_lora

log = logging.getLogger(__name__)


class LoraRows:
    """Which request each sample of the current forward belongs to: the rows of ``lora_scales``.
    One holder shared by every ``LoraLinear`` of a transformer; the loop sets it before each step."""

    def __init__(self) -> None:
        self.index: torch.Tensor | None = None


class LoraLinear(torch.nn.Linear):
    lora_down: torch.Tensor | None  # (R, in): the batch's adapters' A, concatenated
    lora_up: torch.Tensor | None  # (out, R): their B
    lora_scales: torch.Tensor | None  # (requests, R): scale * alpha / r per rank row; 0 = not this request's
    lora_rows: LoraRows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.lora_down is None:
            return y
        scales = self.lora_scales[self.lora_rows.index]  # (B, R)
        hidden = F.linear(x, self.lora_down)  # (B, ..., R)
        scales = scales.view(scales.shape[0], *([1] * (hidden.dim() - 2)), scales.shape[1])
        return y + F.linear(hidden * scales, self.lora_up)


def enable_lora(transformer: torch.nn.Module) -> dict[str, LoraLinear]:
    """Turn every Linear of the transformer into a LoraLinear (no delta yet). Returns them by path."""
    rows = LoraRows()
    layers = {}
    for name, module in transformer.named_modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = LoraLinear
            module.lora_down = module.lora_up = module.lora_scales = None
            module.lora_rows = rows
            layers[name] = module
        elif isinstance(module, LoraLinear):
            layers[name] = module
    return layers


@dataclass(eq=False)
class Adapter:
    """One LoRA loaded for this model: its layers on the model's device and dtype."""

    sha256: str
    name: str
    layers: dict[str, LoraLayer]
    format: str

    @property
    def nbytes(self) -> int:
        return sum(
            layer.down.numel() * layer.down.element_size() + layer.up.numel() * layer.up.element_size()
            for layer in self.layers.values()
        )

    @property
    def rank(self) -> int:
        return max(layer.down.shape[0] for layer in self.layers.values())


RequestLoras = list[tuple[Adapter, float]]  # one request's adapters with their scales


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    load_seconds: float = 0.0
    evictions: int = 0


class AdapterCache:
    """Adapters by content hash, least recently used dropped past a byte budget. A new adapter is
    loaded and validated completely before anything is evicted, so a failed load changes nothing."""

    def __init__(
        self,
        transformer: torch.nn.Module,
        max_bytes: int,
        max_rank: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        self.transformer = transformer
        # Where and in what the deltas compute: the model's device and dtype, which a quantized or
        # offloaded weight's storage does not tell (int8 on the device, bf16 in host memory).
        parameter = next(transformer.parameters())
        self.device = device if device is not None else parameter.device
        self.dtype = dtype if dtype is not None else parameter.dtype
        self.max_bytes = max_bytes
        self.max_rank = max_rank
        self._adapters: OrderedDict[str, Adapter] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = CacheStats()

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._adapters.values())

    def get(self, path: Path, sha256: str, name: str, keep: set[str] = frozenset()) -> Adapter:
        """The adapter in ``path`` (named ``sha256``); ``keep``: hashes not to evict (the batch's)."""
        with self._lock:
            if sha256 in self._adapters:
                self._adapters.move_to_end(sha256)
                self.stats.hits += 1
                return self._adapters[sha256]
        started = time.perf_counter()
        weights = load_lora(Path(path), self.transformer, self.max_rank)
        layers = {
            module: LoraLayer(
                down=layer.down.to(self.device, self.dtype),
                up=layer.up.to(self.device, self.dtype),
                multiplier=layer.multiplier,
            )
            for module, layer in weights.layers.items()
        }
        adapter = Adapter(sha256=sha256, name=name, layers=layers, format=weights.format)
        if adapter.nbytes > self.max_bytes:
            raise LoraError(
                f"{adapter.nbytes} bytes loaded, over this server's adapter memory budget of {self.max_bytes}"
            )
        with self._lock:
            self.stats.misses += 1
            self.stats.load_seconds += time.perf_counter() - started
            self._adapters[sha256] = adapter
            while self.nbytes > self.max_bytes:
                victim = next((k for k in self._adapters if k != sha256 and k not in keep), None)
                if victim is None:
                    break
                del self._adapters[victim]
                self.stats.evictions += 1
        log.info(
            "LoRA %s loaded (%s, rank %d, %d layers) in %.2f s",
            name,
            adapter.format,
            adapter.rank,
            len(layers),
            time.perf_counter() - started,
        )
        return adapter


def activate(
    layers: dict[str, LoraLinear],
    requests: list[RequestLoras],
    pad_to: int | Sequence[int] | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Give every layer the batch's concatenated adapters and per-request scales.

    ``pad_to`` is for a compiled transformer, whose graphs depend on which layers have deltas and on
    their shapes. None: exact ranks, deltas only on the layers the batch's adapters touch (eager).
    An int: every layer gets deltas of exactly that total rank (zero rows). A sequence of rank buckets
    (FluxModel.lora_rank_buckets): every layer gets deltas padded to the smallest bucket that holds
    the batch's largest total rank, so all layers share one shape. With ``pad_to`` set, a batch with
    no adapter at all runs with no deltas (the LoRA-free graph: no padded matmuls to pay for).
    ``device``, ``dtype``: where the deltas compute (the model's); unset, the weight's, which is
    wrong for an offloaded weight (in host memory) and cannot make a quantized one's zeros."""
    adapters = list({id(a): a for loras in requests for a, _ in loras}.values())
    if not adapters and pad_to is not None and not isinstance(pad_to, int):
        deactivate(layers)
        return
    width = None
    if pad_to is not None:
        need = max(
            (sum(a.layers[name].down.shape[0] for a in adapters if name in a.layers) for name in layers), default=0
        )
        if isinstance(pad_to, int):
            width = pad_to
        else:
            from runners.backends.compiled import bucket_for

            width = min(bucket_for(need, tuple(pad_to)), max(pad_to))
        if need > width:
            raise LoraError(f"the batch's LoRAs need rank {need}, over the padded {width}")
    # Padded (compiled): at least two rows of scales, the extra ones never indexed, so one request's
    # scales do not have a dimension of size 1, which dynamo would compile a graph of its own for.
    rows = len(requests) if pad_to is None else max(len(requests), 2)
    for name, module in layers.items():
        parts = [(a, a.layers[name]) for a in adapters if name in a.layers]
        if not parts and width is None:
            module.lora_down = module.lora_up = module.lora_scales = None
            continue
        weight = module.weight
        like = dict(device=device or weight.device, dtype=dtype or weight.dtype)
        rank = sum(layer.down.shape[0] for _, layer in parts)
        size = width if width is not None else rank
        down = torch.zeros(size, module.in_features, **like)
        up = torch.zeros(module.out_features, size, **like)
        scales = torch.zeros(rows, size, **like)
        offset = 0
        for adapter, layer in parts:
            r = layer.down.shape[0]
            down[offset : offset + r] = layer.down
            up[:, offset : offset + r] = layer.up
            for row, loras in enumerate(requests):
                for used, scale in loras:
                    if used is adapter:
                        scales[row, offset : offset + r] += scale * layer.multiplier
            offset += r
        module.lora_down, module.lora_up, module.lora_scales = down, up, scales


def deactivate(layers: dict[str, LoraLinear], pad_to: int | None = None) -> None:
    """No deltas on any layer. ``pad_to`` (an int, the old fixed-rank contract): keep the padded
    deltas and zero their scales instead, so the compiled shapes stay as they were."""
    for module in layers.values():
        if pad_to is None or not isinstance(pad_to, int):
            module.lora_down = module.lora_up = module.lora_scales = None
        elif module.lora_scales is not None:
            module.lora_scales = torch.zeros_like(module.lora_scales)


def set_rows(layers: dict[str, LoraLinear], index: torch.Tensor) -> None:
    """Which request each sample of the next forward belongs to (one holder serves every layer)."""
    next(iter(layers.values())).lora_rows.index = index


@dataclass
class FusedWeights:
    """Original weights of the layers a fuse changed, to put back bit for bit."""

    originals: dict[str, torch.Tensor] = field(default_factory=dict)


@torch.no_grad()
def fuse(layers: dict[str, torch.nn.Linear], loras: RequestLoras, keep_originals: bool) -> FusedWeights:
    """W += sum(scale * alpha/r * B A), computed in float32. Returns the originals when asked."""
    fused = FusedWeights()
    for name, module in layers.items():
        parts = [(adapter.layers[name], scale) for adapter, scale in loras if name in adapter.layers]
        if not parts:
            continue
        if keep_originals:
            fused.originals[name] = module.weight.detach().clone()
        delta = sum(scale * layer.multiplier * (layer.up.float() @ layer.down.float()) for layer, scale in parts)
        module.weight.copy_((module.weight.float() + delta).to(module.weight.dtype))
    return fused


def fuse_fits(layers: dict[str, torch.nn.Linear], loras: RequestLoras) -> bool:
    """Whether the copy of the originals a fuse keeps (for a bit-exact restore) fits beside the model:
    always on the CPU; on a GPU only with 1.5x that much memory free (else deltas are used). Free is
    what the driver has free plus what PyTorch's caching allocator holds unused: the driver's figure
    alone misses the blocks the allocator keeps after a step, which serve the copy first."""
    names = {name for adapter, _ in loras for name in adapter.layers}
    weights = [layers[name].weight for name in names if name in layers]
    if not weights or weights[0].device.type != "cuda":
        return True
    device = weights[0].device
    needed = sum(w.numel() * w.element_size() for w in weights)
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free + cached > 1.5 * needed


@torch.no_grad()
def unfuse(layers: dict[str, torch.nn.Linear], fused: FusedWeights) -> None:
    for name, original in fused.originals.items():
        layers[name].weight.copy_(original)
