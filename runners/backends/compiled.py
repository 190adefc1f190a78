"""``FLUX_BACKEND=compile``: torch.compile of the transformer (and optionally the VAE), the attention
backend, the LoRA rank buckets, and the count of compiles an operator watches (docs/compile.md).

Regional compilation (``FLUX_COMPILE_SCOPE=blocks``, the default): diffusers' ``compile_repeated_blocks``
compiles FluxTransformer2DModel's ``_repeated_blocks`` (``FluxTransformerBlock``,
``FluxSingleTransformerBlock``) in place, fullgraph. Every instance of a class runs the same code, and
dynamo lifts each block's parameters to graph inputs, so the 57 blocks share two compiled graphs: the
compile takes seconds where the whole model takes minutes. The glue around them (embeddings, norm_out,
proj_out) stays eager, and so the first-block cache can still run the first block, then the others,
on a sub-batch of its own.

No recompile on live traffic: the blocks are compiled with ``dynamic=True``, so batch size, image
tokens (any size, fal's presets or custom) and LoRA rank are symbols of one graph, not constants.
What stays specialised is what dynamo always specialises: a dimension of size 1 (a forward of one
sample; LoRA scales for one request), and whether a layer has deltas at all. Those few variants
are what the warm-up runs (runners/worker/loading.py) before the server reports ready.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

log = logging.getLogger(__name__)

# diffusers attention backends that run only on CUDA kernels (refused on a CPU-only server).
_PORTABLE_ATTENTION = {"native", "_native_math", "flex"}


def check_attention_backend(name: str, device_type: str) -> None:
    """Refuse, with the reason and what to install or change, an attention backend this process
    cannot run: unknown to diffusers, fetched from the hub at start (this server runs offline),
    needing CUDA on a CPU server, or whose library is missing (diffusers' own availability check)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    names = sorted(member.value for member in AttentionBackendName)
    if name not in names:
        raise RuntimeError(f"FLUX_ATTENTION_BACKEND={name} is not one of diffusers' attention backends: {names}")
    if name.endswith("_hub"):
        raise RuntimeError(
            f"FLUX_ATTENTION_BACKEND={name} downloads its kernel from the Hugging Face hub when the model "
            "starts; this server does not fetch code at start. Install the library instead and name its "
            "local backend (flash, _flash_3, sage)"
        )
    if device_type != "cuda" and name not in _PORTABLE_ATTENTION:
        raise RuntimeError(
            f"FLUX_ATTENTION_BACKEND={name} runs on CUDA only and this server runs on {device_type}: "
            f"leave it unset, or use one of {sorted(_PORTABLE_ATTENTION)}"
        )
    try:
        _check_attention_backend_requirements(AttentionBackendName(name))
    except RuntimeError as exc:
        raise RuntimeError(f"FLUX_ATTENTION_BACKEND={name} cannot be used: {exc}") from None


def set_attention_backend(transformer, name: str, device_type: str) -> None:
    check_attention_backend(name, device_type)
    transformer.set_attention_backend(name)
    log.info("attention backend %s", name)


def compile_options(backend: str, mode: str) -> dict:
    """torch.compile's keyword arguments: ``mode`` is inductor's alone."""
    options: dict = {"backend": backend, "dynamic": True}
    if backend == "inductor" and mode != "default":
        options["mode"] = mode
    return options


def compile_transformer(transformer, scope: str, backend: str, mode: str):
    """The transformer to run: compiled in place block by block (``blocks``), or a whole-model
    ``torch.compile`` wrapper (``model``; the loop then cannot split it for the first-block cache)."""
    import torch

    options = compile_options(backend, mode)
    if scope == "blocks":
        transformer.compile_repeated_blocks(fullgraph=True, **options)
        return transformer
    return torch.compile(transformer, **options)


# Graphs dynamo keeps per code object (a block class's forward) before it stops compiling it: the
# warm-up builds 8 for FluxSingleTransformerBlock (batch 1 or more, two input layouts, LoRA or not),
# exactly dynamo's default limit, past which a fullgraph compile fails the request outright.
RECOMPILE_LIMIT = 64


@contextlib.contextmanager
def compile_settings() -> Iterator[None]:
    """Dynamo's settings for the compiled transformer, around every call that may compile. They are
    thread-local in torch (a setting made in the loading thread is not seen by the step engine's),
    so the backend enters this around each forward (runners/backends/eager.py), whatever thread runs it.

    - The LoRA deltas are plain tensor attributes of each layer, whose shapes dynamo takes as
      constants by default (``force_nn_module_property_static_shapes``): their rank becomes a symbol,
      so every rank bucket runs one graph (parameters stay static: ``force_parameter_static_shapes``).
    - Duck shaping is off: two sizes that happen to be equal when a graph is traced (a rank of 16 and
      16 image tokens) are not assumed equal forever, which would recompile the first time they differ.
    - The recompile limit is raised (``RECOMPILE_LIMIT``): at dynamo's default of 8 graphs per code
      object, the single block's warm-up is at the limit already, and one more variant fails its
      request (fullgraph) instead of compiling, which ``flux_compiles_total`` would then show."""
    import torch._dynamo
    import torch.fx.experimental._config as fx_config

    with (
        torch._dynamo.config.patch(force_nn_module_property_static_shapes=False, recompile_limit=RECOMPILE_LIMIT),
        fx_config.patch(use_duck_shape=False),
    ):
        yield


def compile_vae(vae, backend: str, mode: str) -> None:
    """The VAE's encoder and decoder compiled in place (``FLUX_COMPILE_VAE``)."""
    options = compile_options(backend, mode)
    vae.encoder.compile(**options)
    vae.decoder.compile(**options)


def uncompile(pipeline) -> None:
    """Undo ``compile_transformer(scope="blocks")`` and ``compile_vae`` (both compile modules in
    place): the modules run eager again. For benchmarks that compare backends in one process."""
    for component in (pipeline.transformer, pipeline.vae):
        for module in component.modules():
            module._compiled_call_impl = None


def rank_buckets(max_rank: int, max_per_request: int, smallest: int = 16) -> tuple[int, ...]:
    """The total LoRA ranks a batch's deltas are padded to: powers of two from ``smallest`` up to the
    most a request can bring (``max_rank x max_per_request``), which is always the last. A batch pads
    to the smallest bucket that holds it, so a rank-16 LoRA pays for 16 rows, not 512."""
    cap = max_rank * max_per_request
    buckets = []
    size = smallest
    while size < cap:
        buckets.append(size)
        size *= 2
    buckets.append(cap)
    return tuple(buckets)


def bucket_for(rank: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket holding ``rank``; over the largest, ``rank`` itself (the caller refuses it)."""
    return next((b for b in buckets if b >= rank), rank)


_compiles_lock = threading.Lock()
_compile_listeners: list = []
_hooked = False


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process, recompiles included (its own counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def on_compile(listener) -> None:
    """Call ``listener(new_graphs)`` after each compile that produced graphs (from dynamo's own
    end-of-compile callback and ``counters["stats"]["unique_graphs"]``): the worker's metric."""
    global _hooked
    from torch._dynamo.callback import callback_handler

    with _compiles_lock:
        _compile_listeners.append(listener)
        if _hooked:
            return
        _hooked = True
        seen = [graphs_compiled()]

    def ended(_args) -> None:
        with _compiles_lock:
            now = graphs_compiled()
            new, seen[0] = (now - seen[0] if now >= seen[0] else now), now  # torch._dynamo.reset clears it
            listeners = list(_compile_listeners)
        if new > 0:
            for callback in listeners:
                callback(new)

    callback_handler.register_end_callback(ended)
