"""Export the three networks of ``export.networks`` to ONNX, check the graphs, and validate them
against the eager torch modules with ONNX Runtime.

Export goes through ``torch.onnx.export(..., dynamo=True)`` (torch.export, then onnxscript) with
the dynamic axes of each spec. Graphs are float32: ONNX Runtime serves them so (its CPU provider
has no bfloat16 kernels for these graphs), and TensorRT builds its fp16/bf16 engines from them.

No copy of a network is made to export it, whatever its size and dtype: the graph is traced from a
*meta twin* (the network's structure on the ``meta`` device, in float32: no storage at all), and
each weight is bound to the graph as a lazy tensor that reads the live parameter and casts it to
float32 when, and only when, the file writer reaches it. At most one weight exists in float32 at a
time (FLUX.1-dev's largest is 189 MB), on the host; the served model is never touched. Graphs past
1.5 GB keep their weights in a ``.data`` file beside the ``.onnx`` (written into the artifact's
temporary folder, which is renamed into place whole).

FLUX's RoPE (diffusers ``FluxPosEmbed``) computes its frequencies in float64 on every device but
MPS. Exported as is, the graph casts to float64 (TensorRT has no float64), so the twin's
``FluxPosEmbed`` gets a float32 ``forward`` for the export (``float32_rope``); ``check_onnx``
counts float64 left in a graph.

Validation compares the ONNX graph with the live module (float64 RoPE, the served dtype), i.e. with
what the torch backend serves, on seeded random inputs. The torch outputs are computed first; then
one ONNX Runtime session, on the provider of the device the model is on (CUDA for a GPU model, never
the CPU in its place), runs the same inputs and is freed before ``validate`` returns, so the next
network's export never shares memory with it. Shapes: for full-size models the smallest of the
configured optimisation profile (``export.build.validation_shapes``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import logging
import re
import time
import types
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.networks import (
    HEIGHT,
    LATENT_HEIGHT,
    LATENT_WIDTH,
    WIDTH,
    NetworkSpec,
    module_device,
    vae_module,
    vae_scale_factor,
)

log = logging.getLogger(__name__)

EXTERNAL_DATA_THRESHOLD = 1_500_000_000  # bytes of float32 weights past which they go to a .data file
EXPORT_BATCH = 2  # >= 2: torch.export specialises dimensions whose example value is 0 or 1
EXPORT_SIZE = (64, 48)  # (height, width) pixels of the export example: 12 image tokens, latents 8 x 6
EXPORT_TEXT_TOKENS = 7  # distinct from every other example dimension, so no two axes get unified


# -- export ------------------------------------------------------------------------------------


def _rope_float32_forward(self, ids: torch.Tensor):
    """diffusers ``FluxPosEmbed.forward`` with float32 frequencies instead of float64."""
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    pos = ids.float()
    cos_out, sin_out = [], []
    for i in range(ids.shape[-1]):
        cos, sin = get_1d_rotary_pos_embed(
            self.axes_dim[i],
            pos[:, i],
            theta=self.theta,
            repeat_interleave_real=True,
            use_real=True,
            freqs_dtype=torch.float32,
        )
        cos_out.append(cos)
        sin_out.append(sin)
    return torch.cat(cos_out, dim=-1).to(ids.device), torch.cat(sin_out, dim=-1).to(ids.device)


@contextlib.contextmanager
def float32_rope(module: torch.nn.Module) -> Iterator[int]:
    """Within the block, every ``FluxPosEmbed`` inside ``module`` computes RoPE in float32 (an
    instance attribute shadowing the class's ``forward``). Yields how many were patched; removed
    on exit whatever happens, so the class and other instances are never touched."""
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    patched = [m for m in module.modules() if isinstance(m, FluxPosEmbed) and "forward" not in vars(m)]
    try:
        for m in patched:
            m.forward = types.MethodType(_rope_float32_forward, m)
        yield len(patched)
    finally:
        for m in patched:
            vars(m).pop("forward", None)


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in flags:
            m.training = training


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """The exporter's optimizer logs every rewrite at INFO and torch warns about intended things
    (one Dim shared by several inputs); keep both out of the export's own log for its duration."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*will not be used, since it shares the same shape constraints")
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
        try:
            for logger in loggers:
                logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


GRAPH_DTYPE = torch.float32  # the dtype of every exported graph's floating tensors


def live_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``module`` by its state-dict name (tied weights under each name):
    the names the exporter gives the graph's initializers."""
    return {
        **dict(module.named_parameters(remove_duplicate=False)),
        **dict(module.named_buffers(remove_duplicate=False)),
    }


def meta_twin(module: torch.nn.Module, dtype: torch.dtype = GRAPH_DTYPE) -> torch.nn.Module:
    """``module``'s structure on the ``meta`` device with its floating parameters and buffers in
    ``dtype``: traced by the exporter, it gives the graph of a ``dtype`` network without one byte of
    weights. Made by ``deepcopy`` with every tensor pre-mapped to its meta stand-in, so the copy
    shares no storage with the live module and modules, hooks and tied weights keep their shape."""
    memo: dict[int, Any] = {}
    for tensor in live_tensors(module).values():
        if id(tensor) in memo:
            continue
        empty = torch.empty(tensor.shape, dtype=dtype if tensor.is_floating_point() else tensor.dtype, device="meta")
        memo[id(tensor)] = (
            torch.nn.Parameter(empty, requires_grad=False) if isinstance(tensor, torch.nn.Parameter) else empty
        )
    twin = copy.deepcopy(module, memo)
    real = [name for name, t in live_tensors(twin).items() if not t.is_meta]
    if real:  # every tensor the module registers is mapped above; anything else would be a silent copy
        raise RuntimeError(f"the meta twin of {type(module).__name__} holds real tensors: {real[:5]}")
    return twin


def _host_weight(tensor: torch.Tensor, dtype: torch.dtype, name: str, perm: tuple[int, ...] | None = None):
    """The ONNX tensor of one live weight in ``dtype`` (permuted by ``perm``), on the host: made when
    the writer asks for it, dropped once written."""
    import onnx_ir as ir

    target = dtype if tensor.is_floating_point() else tensor.dtype
    host = tensor.detach().to(device="cpu", dtype=target)
    if perm is not None:
        host = host.permute(perm)
    return ir.tensor(host.contiguous().numpy(), name=name)


def _is_meta(value) -> bool:
    raw = getattr(value, "raw", None)
    return isinstance(raw, torch.Tensor) and raw.is_meta


def bind_weights(graph_model, tensors: dict[str, torch.Tensor], dtype: torch.dtype = GRAPH_DTYPE) -> int:
    """Point every initializer of ``graph_model`` (an onnx_ir Model traced from a meta twin) named in
    ``tensors`` at the live weight, cast to ``dtype`` lazily (``onnx_ir.LazyTensor``, not cached), and
    fold the transposes of weights (a Linear's ``Transpose(W)``) into lazy transposed weights, as the
    exporter's optimizer would, but without computing them now. Returns how many weights were bound;
    refuses a graph left with a weight that has no data."""
    import onnx_ir as ir

    bound: dict[str, torch.Tensor] = {}
    for name, value in graph_model.graph.initializers.items():
        tensor = tensors.get(name)
        if tensor is None or value.const_value is None:
            continue
        value.const_value = ir.LazyTensor(
            functools.partial(_host_weight, tensor, dtype, name),
            dtype=value.const_value.dtype,
            shape=ir.Shape(tuple(tensor.shape)),
            name=name,
        )
        bound[name] = tensor
    unbound = [name for name, value in graph_model.graph.initializers.items() if _is_meta(value.const_value)]
    if unbound:
        raise RuntimeError(f"exported graph initializers with no live weight behind them: {unbound[:5]}")
    _fold_weight_transposes(graph_model.graph, bound, dtype)
    return len(bound)


def _fold_weight_transposes(graph, bound: dict[str, torch.Tensor], dtype: torch.dtype) -> int:
    """Replace ``Transpose(weight)``, where the bound weight has no other use, by a lazy initializer
    holding the transposed weight under the transpose's output name (what the exporter's constant
    folding makes of it, eagerly and for every weight at once)."""
    import onnx_ir as ir

    folded = 0
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 1:
            continue
        source = node.inputs[0]
        if source is None or source.name not in bound or len(source.uses()) != 1:
            continue
        if graph.initializers.get(source.name) is not source:
            continue
        rank = len(source.const_value.shape)
        perm_attribute = node.attributes.get("perm")
        perm = tuple(perm_attribute.as_ints()) if perm_attribute is not None else tuple(reversed(range(rank)))
        output = node.outputs[0]
        name = output.name
        shape = ir.Shape([source.const_value.shape[i] for i in perm])
        lazy = ir.LazyTensor(
            functools.partial(_host_weight, bound[source.name], dtype, name, perm),
            dtype=source.const_value.dtype,
            shape=shape,
            name=name,
        )
        value = ir.Value(shape=shape, type=ir.TensorType(source.const_value.dtype), const_value=lazy)
        ir.convenience.replace_all_uses_with(output, value)
        graph.remove(node, safe=True)
        graph.initializers.pop(source.name)
        value.name = name
        graph.register_initializer(value)
        folded += 1
    return folded


MATERIALIZED_LIMIT = 1 << 20  # elements: a weight this large is only ever made while it is written


def check_lazy(graph_model) -> None:
    """Every large initializer is still lazy after the optimizer ran: none holds its data in memory."""
    import onnx_ir as ir

    held = [
        name
        for name, value in graph_model.graph.initializers.items()
        if value.const_value is not None
        and value.const_value.size > MATERIALIZED_LIMIT
        and not isinstance(value.const_value, ir.LazyTensor)
    ]
    if held:
        raise RuntimeError(f"the ONNX optimizer materialised {len(held)} large weights in memory, e.g. {held[:3]}")


def _check_no_active_lora(module: torch.nn.Module) -> None:
    for name, m in module.named_modules():
        if getattr(m, "lora_down", None) is not None:
            raise RuntimeError(f"{name} carries per-request LoRA deltas; export the base model (fused LoRAs are fine)")


def dynamic_shapes(spec: NetworkSpec, model: Any) -> tuple[dict[int, Any], ...]:
    """torch.export dynamic shapes for ``spec.inputs_for(model)``, from ``spec.dynamic_axes``: one
    ``Dim`` per axis name, shared across inputs; pixel height/width are 8 x the latent dims."""
    dims: dict[str, Any] = {}

    def dim(axis: str):
        if axis not in dims:
            if axis in (HEIGHT, WIDTH):  # images must be whole latent cells
                latent = dim(LATENT_HEIGHT if axis == HEIGHT else LATENT_WIDTH)
                dims[axis] = vae_scale_factor(vae_module(model)) * latent
            else:
                dims[axis] = torch.export.Dim(axis, min=1)
        return dims[axis]

    return tuple(
        {index: dim(axis) for index, axis in spec.dynamic_axes[name].items()} for name in spec.inputs_for(model)
    )


def name_output_dims(spec: NetworkSpec, graph_model) -> None:
    """Give outputs' dims that torch left as opaque symbols (``s38``: e.g. the encoder's latent
    height, computed through strided convolutions) the spec's axis name, so the graph's interface
    reads like ``spec.dynamic_axes``. Named or fixed dims are left as they are."""
    import onnx_ir as ir

    for value in graph_model.graph.outputs:
        axes = spec.dynamic_axes.get(value.name, {})
        if value.shape is None or not axes:
            continue
        dims = list(value.shape.dims)
        for index, axis in axes.items():
            if isinstance(dims[index], ir.SymbolicDim) and re.fullmatch(r"s\d+|unk__\d+|None", str(dims[index].value)):
                dims[index] = ir.SymbolicDim(axis)
        value.shape = ir.Shape(dims)


def weight_bytes(module: torch.nn.Module, dtype: torch.dtype = GRAPH_DTYPE) -> int:
    """Bytes of ``module``'s parameters and buffers with the floating ones in ``dtype`` (meta modules too)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(
        t.numel() * (itemsize if t.is_floating_point() else t.element_size())
        for t in [*module.parameters(), *module.buffers()]
    )


def export_onnx(
    spec: NetworkSpec,
    model: Any,
    path: Path,
    *,
    opset: int | None = None,
    batch: int = EXPORT_BATCH,
    size: tuple[int, int] = EXPORT_SIZE,
    text_tokens: int = EXPORT_TEXT_TOKENS,
) -> Path:
    """Export ``spec``'s network of ``model`` to ``path`` (float32, dynamic axes) and return the
    .onnx path. Weights over 1.5 GB go to an external data file beside it (``<name>.data``);
    smaller graphs are one self-contained file. ``opset``: None for the exporter's default.
    Nothing is copied from the live network but the weights being written (a few at a time)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    live = spec.module(model)
    _check_no_active_lora(live)
    twin = meta_twin(live)
    inputs = spec.sample_inputs(model, batch, size[0], size[1], text_tokens, device="meta")
    size_bytes = weight_bytes(twin)
    external = size_bytes > EXTERNAL_DATA_THRESHOLD
    log.info(
        "exporting %s (%.1f MB float32, example B%d %dx%d, %s) to %s",
        spec.name,
        size_bytes / 1e6,
        batch,
        size[1],
        size[0],
        "external data" if external else "single file",
        path,
    )
    started = time.perf_counter()
    with eval_mode(twin), float32_rope(twin) as patched, quiet_exporter():
        if patched:
            log.info("%s: %d FluxPosEmbed computing RoPE in float32 for the export", spec.name, patched)
        # optimize=False: the optimizer folds constants, which needs the weights bound first.
        program = torch.onnx.export(
            twin,
            inputs,
            None,
            dynamo=True,
            dynamic_shapes=dynamic_shapes(spec, model),
            input_names=list(spec.inputs_for(model)),
            output_names=list(spec.output_names),
            opset_version=opset,
            optimize=False,
            verbose=False,
        )
        program.exported_program = None  # the trace of the twin: not needed past this point
        bound = bind_weights(program.model, live_tensors(live))
        program.optimize()
        check_lazy(program.model)
        name_output_dims(spec, program.model)
        path.with_name(f"{path.name}.data").unlink(missing_ok=True)  # no stale weights beside a new graph
        program.save(str(path), external_data=external)
    del program, twin
    gc.collect()
    log.info(
        "exported %s in %.1f s (%d weights, %.1f MB on disk)",
        spec.name,
        time.perf_counter() - started,
        bound,
        onnx_bytes(path) / 1e6,
    )
    return path


# -- checking --------------------------------------------------------------------------------


@dataclass
class OnnxSummary:
    """What ``check_onnx`` read back: tensor names with their dims (str = symbolic, int = fixed)."""

    path: Path
    inputs: dict[str, list[int | str]]
    outputs: dict[str, list[int | str]]
    opset: int
    bytes: int  # the .onnx file plus its external data files
    float64: int  # nodes casting to / initializers in float64 (TensorRT has no float64): 0 expected


def _dims(value_info) -> list[int | str]:
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in value_info.type.tensor_type.shape.dim]


def onnx_bytes(path: Path) -> int:
    """The .onnx file's size plus the external data files it names."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    locations = {ExternalDataInfo(t).location for t in proto.graph.initializer if uses_external_data(t)}
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations)


def check_onnx(path: Path) -> OnnxSummary:
    """``onnx.checker.check_model`` on the path (so external data and graphs over 2 GB work), then
    the graph's interface, read without loading the weights."""
    import onnx

    path = Path(path)
    started = time.perf_counter()
    onnx.checker.check_model(str(path))
    proto = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    double = onnx.TensorProto.DOUBLE
    float64 = sum(1 for t in proto.graph.initializer if t.data_type == double) + sum(
        1
        for n in proto.graph.node
        if any(a.name == "to" and a.i == double for a in n.attribute)
        or any(a.name == "value" and a.t.data_type == double for a in n.attribute)
    )
    summary = OnnxSummary(
        path=path,
        inputs={i.name: _dims(i) for i in proto.graph.input},
        outputs={o.name: _dims(o) for o in proto.graph.output},
        opset=opset,
        bytes=onnx_bytes(path),
        float64=float64,
    )
    log.info(
        "checked %s in %.2f s: opset %d, inputs %s, outputs %s",
        path.name,
        time.perf_counter() - started,
        opset,
        summary.inputs,
        summary.outputs,
    )
    if float64:
        log.warning("%s has %d float64 nodes or initializers: TensorRT cannot build it", path.name, float64)
    return summary


# -- validation ------------------------------------------------------------------------------


@dataclass
class ValidationRow:
    """ONNX Runtime against torch at one shape. ``shape`` is ``B<batch> <width>x<height>`` (pixels,
    WIDTHxHEIGHT as FLUX_EXPORT_SIZES writes sizes). ``max_abs`` = max |onnx - torch|; ``max_rel``
    = max_abs / max |torch| (error relative to the output's scale: elementwise |a-b|/|b| is
    meaningless where outputs cross zero). ``ok``: same shape, all finite, and
    ``max_abs <= tolerance * max(1, max |torch|)``, i.e. absolute for outputs within unit magnitude
    (images in [-1, 1], FLUX velocities) and relative beyond it (e.g. VAE log-variances)."""

    network: str
    shape: str
    max_abs: float
    max_rel: float
    tolerance: float
    ok: bool
    error: str = field(default="")  # why the graph could not be run at all, if it could not
    provider: str = field(default="")  # the ONNX Runtime execution provider that ran the graph


def ort_session(path: Path, device: torch.device | str = "cpu"):
    """An ONNX Runtime session for ``path`` on the provider of ``device`` (the CUDA provider for a
    CUDA model, refused without one: see ``runners.backends.onnx_runtime.session_providers``)."""
    from runners.backends.onnx_runtime import create_session

    # One forward only: no packed copies of the weights, which stay in the memory-mapped .data file.
    return create_session(path, torch.device(device), prepack=False)


def compare(network: str, shape: str, actual: np.ndarray, expected: np.ndarray, tolerance: float) -> ValidationRow:
    if actual.shape != expected.shape:
        return ValidationRow(
            network,
            shape,
            float("inf"),
            float("inf"),
            tolerance,
            False,
            f"output shape {actual.shape} != torch's {expected.shape}",
        )
    actual, expected = actual.astype(np.float64), expected.astype(np.float64)
    max_abs = float(np.max(np.abs(actual - expected))) if actual.size else 0.0
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    finite = bool(np.isfinite(actual).all() and np.isfinite(expected).all())
    if not finite:
        max_abs = float("inf")
    max_rel = max_abs / max(scale, 1e-6)
    ok = finite and max_abs <= tolerance * max(1.0, scale)
    return ValidationRow(network, shape, max_abs, max_rel, tolerance, ok)


def _as_served(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An input as the loop hands it to the network: in the model's dtype, but for FLUX's guidance,
    which the loop passes in float32 (runners/pipeline/inpaint.py)."""
    if not tensor.is_floating_point() or name == "guidance":
        return tensor
    return tensor.to(dtype)


def default_tolerance(dtype: torch.dtype) -> float:
    """The largest error ``validate`` accepts by default for a model served in ``dtype`` (the float32
    graph against the module computing in ``dtype``): float32 1e-3 (the tiny model shows ~1e-5);
    bfloat16 and float16 5e-2 (``random:flux-dev-2block`` in bfloat16 shows ~1e-2: bf16's 8-bit
    mantissa, 2^-8 = 4e-3 per rounding, accumulated over a block's matmuls and norms)."""
    return 1e-3 if dtype == torch.float32 else 5e-2


def validate(
    spec: NetworkSpec,
    model: Any,
    onnx_path: Path,
    shapes: list[tuple[int, int, int]],
    text_tokens: int,
    tolerance: float,
    *,
    seed: int = 1234,
) -> list[ValidationRow]:
    """Check the graph, then run the live torch module and ONNX Runtime on the same random inputs
    (seeded, one seed per shape) at each (batch, height, width) and compare. The torch outputs come
    first; the session is made after them, on the model's device's provider, and freed before this
    returns. A graph that cannot be run with the spec's inputs at a shape gives a failed row with
    ``error`` set rather than an exception."""
    check_onnx(onnx_path)
    module = spec.module(model)
    device = module_device(module)
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    names = spec.inputs_for(model)
    cases = []
    for index, (batch, height, width) in enumerate(shapes):
        inputs = spec.sample_inputs(model, batch, height, width, text_tokens, seed=seed + index, device=device)
        served = [_as_served(n, t, dtype) for n, t in zip(names, inputs, strict=True)]
        started = time.perf_counter()
        with torch.inference_mode(), eval_mode(module):
            expected = module(*served).float().cpu().numpy()
        # ONNX Runtime gets the very values torch got (rounded to the served dtype), in float32.
        feed = {n: t.detach().to("cpu", torch.float32).numpy() for n, t in zip(names, served, strict=True)}
        cases.append((f"B{batch} {width}x{height}", feed, expected, time.perf_counter() - started))
        del inputs, served
    started = time.perf_counter()
    session = ort_session(onnx_path, device)
    try:
        provider = session.get_providers()[0]
        log.info("%s: ONNX Runtime session on %s in %.2f s", spec.name, provider, time.perf_counter() - started)
        graph_inputs = [i.name for i in session.get_inputs()]
        rows = []
        for label, feed, expected, torch_seconds in cases:
            if graph_inputs != list(names):
                rows.append(
                    ValidationRow(
                        spec.name,
                        label,
                        float("inf"),
                        float("inf"),
                        tolerance,
                        False,
                        f"graph inputs {graph_inputs} != the spec's {list(names)}",
                    )
                )
                continue
            started = time.perf_counter()
            try:
                actual = session.run(None, feed)[0]
            except Exception as exc:  # noqa: BLE001 - a graph that cannot run is a failed validation
                rows.append(
                    ValidationRow(
                        spec.name, label, float("inf"), float("inf"), tolerance, False, f"{type(exc).__name__}: {exc}"
                    )
                )
                continue
            row = compare(spec.name, label, actual, expected, tolerance)
            row.provider = provider
            rows.append(row)
            log.info(
                "%s %s: max abs %.3g, max rel %.3g (tolerance %g) %s; torch %.2f s, %s %.2f s",
                spec.name,
                label,
                row.max_abs,
                row.max_rel,
                tolerance,
                "ok" if row.ok else "FAILED",
                torch_seconds,
                provider,
                time.perf_counter() - started,
            )
    finally:
        del session  # the session holds the whole graph's weights: gone before the next network
        gc.collect()
    for row in rows:
        if row.error:
            log.warning("%s %s failed: %s", row.network, row.shape, row.error)
    return rows
