"""ONNX graph -> serialized TensorRT engine (a "plan"), and refitting a plan's weights from an ONNX
file with the same graph and new weights (e.g. LoRAs fused in), without a rebuild.

Written against TensorRT 10's documented Python API; the calls and where they are documented:

- ``trt.Builder(logger)``, ``builder.create_network(flags)``, ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``
  (networks are always explicit-batch in TensorRT 10: ``EXPLICIT_BATCH`` is deprecated and ignored),
  ``builder.create_builder_config()``, ``builder.create_optimization_profile()``,
  ``builder.build_serialized_network(network, config)`` (None on failure):
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Builder.html
- ``trt.OnnxParser(network, logger).parse_from_file(path)`` (loads external data next to the file),
  ``num_errors`` / ``get_error(i)``:
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/parsers/Onnx/pyOnnx.html
- ``IBuilderConfig.set_flag(BuilderFlag.FP16 | BF16 | REFIT)``,
  ``set_memory_pool_limit(MemoryPoolType.WORKSPACE, bytes)``, ``add_optimization_profile``,
  ``create_timing_cache`` / ``set_timing_cache`` / ``get_timing_cache`` and ``progress_monitor``:
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/BuilderConfig.html
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/TimingCache.html
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/ProgressMonitor.html
- ``IOptimizationProfile.set_shape(input, min, opt, max)``:
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/OptimizationProfile.html
- refit: ``trt.Refitter`` + ``trt.OnnxParserRefitter.refit_from_file`` + ``refit_cuda_engine`` (see
  ``runners.backends.tensorrt_engine.refit_from_onnx``), then ``ICudaEngine.serialize()``:
  https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/refitting-engines.html

Precision. TensorRT 10 has two typing modes (precision-control page of the developer guide):
weakly typed networks, where builder flags (``FP16``, ``BF16``) let TensorRT pick lower-precision
kernels for an fp32 graph; and strongly typed networks, where the graph's own types decide and
precision flags are not allowed. The project exports fp32 graphs, so fp16/bf16 engines use the weak
flags; a graph that already carries fp16/bf16 types, or FP8 Q/DQ nodes (fp8 is explicit quantization
only, e.g. from NVIDIA ModelOpt), is built strongly typed, as NVIDIA's diffusion demo does for fp8.
TensorRT 11 removed weak typing (every network is strongly typed, the precision flags are gone):
there an fp32 graph can only be built as fp32, and asking for fp16/bf16 says so.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from runners.backends.artifacts import write_atomic
from runners.backends.tensorrt_engine import (
    _parser_error_text,
    get_logger,
    import_tensorrt,
    refit_from_onnx,
    tensorrt_available,
)

Shape = tuple[int, ...]
PRECISIONS = ("fp32", "fp16", "bf16", "fp8")
FP8_MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (8.9) and Hopper (9.0) onwards


def require_tensorrt():
    """The ``tensorrt`` module, or a RuntimeError saying why engines cannot be built here."""
    available, reason = tensorrt_available()
    if not available:
        raise RuntimeError(f"TensorRT engines cannot be built here: {reason}")
    return import_tensorrt()


@dataclass(frozen=True)
class EngineRequest:
    """One engine to build: from ``onnx_path`` to ``engine_path``, one optimization profile per dict
    in ``profiles`` ({input name: (min, opt, max) shape}), at ``precision``; ``refittable`` engines
    can take new weights (fused LoRAs) without a rebuild; ``workspace_bytes`` caps TensorRT's scratch
    memory (None: TensorRT's default, the device's memory); ``timing_cache`` is a file reused and
    updated across builds to skip re-timing layers."""

    onnx_path: Path
    engine_path: Path
    profiles: list[dict[str, tuple[Shape, Shape, Shape]]]
    precision: str = "fp16"
    refittable: bool = False
    workspace_bytes: int | None = None
    timing_cache: Path | None = None

    def __post_init__(self):
        object.__setattr__(self, "onnx_path", Path(self.onnx_path))
        object.__setattr__(self, "engine_path", Path(self.engine_path))
        if self.timing_cache is not None:
            object.__setattr__(self, "timing_cache", Path(self.timing_cache))
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: one of {', '.join(PRECISIONS)}")
        if self.workspace_bytes is not None and self.workspace_bytes <= 0:
            raise ValueError("workspace_bytes must be positive (or None for TensorRT's default)")
        if not self.profiles:
            raise ValueError("at least one optimization profile is needed")
        profiles = []
        for index, profile in enumerate(self.profiles):
            checked = {}
            for name, shapes in profile.items():
                if len(shapes) != 3:
                    raise ValueError(f"profile {index}, input {name!r}: give (min, opt, max) shapes")
                low, opt, high = (tuple(int(d) for d in s) for s in shapes)
                if not len(low) == len(opt) == len(high):
                    raise ValueError(f"profile {index}, input {name!r}: min/opt/max ranks differ: {low}, {opt}, {high}")
                if not all(0 <= a <= b <= c for a, b, c in zip(low, opt, high)):
                    raise ValueError(
                        f"profile {index}, input {name!r}: need 0 <= min <= opt <= max per dimension, "
                        f"got {low}, {opt}, {high}"
                    )
                checked[name] = (low, opt, high)
            profiles.append(checked)
        object.__setattr__(self, "profiles", profiles)


# -- what the graph carries ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GraphTypes:
    """The float types an ONNX graph's tensors use, and whether it has Q/DQ (quantization) nodes."""

    float_types: frozenset[str] = field(default_factory=frozenset)  # e.g. {"FLOAT", "FLOAT16"}
    quantized: bool = False

    @property
    def low_precision(self) -> frozenset[str]:
        return self.float_types & {"FLOAT16", "BFLOAT16"}


def inspect_onnx(onnx_path: Path) -> GraphTypes:
    """Read the graph only (never the external weights): the types of its inputs, outputs and
    weights (initializers and Constant tensors, which say what precision it was exported in; Casts
    inside an fp32 graph do not), and whether it has Q/DQ nodes."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    names = {value: name for name, value in onnx.TensorProto.DataType.items()}
    types: set[str] = set()
    quantized = False

    def visit(graph, top: bool):
        nonlocal quantized
        if top:
            for value in [*graph.input, *graph.output]:
                if value.type.HasField("tensor_type"):
                    types.add(names.get(value.type.tensor_type.elem_type, "?"))
        for tensor in graph.initializer:
            types.add(names.get(tensor.data_type, "?"))
        for node in graph.node:
            quantized |= node.op_type.endswith("QuantizeLinear")  # (De)QuantizeLinear, TRT_FP8(De)QuantizeLinear
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    visit(attribute.g, False)
                elif node.op_type == "Constant" and attribute.type == onnx.AttributeProto.TENSOR:
                    types.add(names.get(attribute.t.data_type, "?"))

    visit(model.graph, True)
    for function in model.functions:
        quantized |= any(node.op_type.endswith("QuantizeLinear") for node in function.node)
    floats = frozenset(t for t in types if t.startswith(("FLOAT", "BFLOAT")) or t == "DOUBLE")
    return GraphTypes(float_types=floats, quantized=quantized)


@dataclass(frozen=True)
class PrecisionPlan:
    strongly_typed: bool
    flags: tuple[str, ...]  # BuilderFlag member names
    note: str


def plan_precision(precision: str, graph: GraphTypes, weak_flags: frozenset[str]) -> PrecisionPlan:
    """How to get ``precision`` from a graph with ``graph``'s types, given which weak-typing builder
    flags this TensorRT has (``FP16``/``BF16``; none in TensorRT 11)."""
    if precision == "fp8":
        if not graph.quantized:
            raise ValueError(
                "fp8 engines need an FP8-quantized graph (QuantizeLinear/DequantizeLinear nodes, e.g. "
                "from NVIDIA TensorRT Model Optimizer); this graph has none: use fp16 or bf16"
            )
        return PrecisionPlan(True, (), "strongly typed: the graph's FP8 Q/DQ nodes set the precision")
    if precision == "fp32":
        if graph.low_precision:
            return PrecisionPlan(True, (), f"strongly typed: the graph itself carries {sorted(graph.low_precision)}")
        return PrecisionPlan(False, (), "fp32 graph, fp32 engine (TF32 math where TensorRT allows it)")
    wanted = {"fp16": "FLOAT16", "bf16": "BFLOAT16"}[precision]
    if graph.quantized or wanted in graph.low_precision:
        return PrecisionPlan(True, (), f"strongly typed: the graph's own {wanted} types set the precision")
    flag = precision.upper()  # BuilderFlag.FP16 / BuilderFlag.BF16
    if flag not in weak_flags:
        raise ValueError(
            f"this TensorRT has no BuilderFlag.{flag} (weak typing was removed in TensorRT 11): export "
            f"the graph in {precision} (e.g. with NVIDIA Model Optimizer AutoCast), or build fp32"
        )
    return PrecisionPlan(False, (flag,), f"weakly typed {sorted(graph.float_types)} graph with BuilderFlag.{flag}")


# -- files -------------------------------------------------------------------------------------------------

# -- build -------------------------------------------------------------------------------------------------


def _clock(log: Callable[[str], None]) -> Callable[[str], None]:
    started = time.perf_counter()
    return lambda message: log(f"[TensorRT {time.perf_counter() - started:7.1f}s] {message}")


def _progress_monitor(trt, say: Callable[[str], None]):
    """Top-level builder phases as progress lines (``trt.IProgressMonitor``; thread-safe, as the docs
    require). None when this TensorRT has no progress monitor."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()
            self._started: dict[str, float] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:
                with self._lock:
                    self._started[phase_name] = time.perf_counter()
                say(f"  {phase_name} ({num_steps} steps) ...")

        def step_complete(self, phase_name, step):
            return True  # never cancel

        def phase_finish(self, phase_name):
            with self._lock:
                began = self._started.pop(phase_name, None)
            if began is not None:
                say(f"  {phase_name} done in {time.perf_counter() - began:.1f} s")

    return Monitor()


def _parser_errors(parser) -> list[str]:
    return [_parser_error_text(parser.get_error(i)) for i in range(parser.num_errors)]


def _check_profiles(network, profiles: list[dict[str, tuple[Shape, Shape, Shape]]]) -> dict[str, Shape]:
    """Every profile names only network inputs, covers every input with a dynamic dimension, and
    agrees with the inputs' ranks and fixed dimensions. Returns the network inputs' shapes."""
    inputs = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        inputs[tensor.name] = tuple(tensor.shape)
    dynamic = sorted(name for name, shape in inputs.items() if any(d < 0 for d in shape))
    for index, profile in enumerate(profiles):
        unknown = sorted(set(profile) - set(inputs))
        if unknown:
            raise ValueError(f"profile {index} names {unknown}, which are not inputs of the network {sorted(inputs)}")
        uncovered = [name for name in dynamic if name not in profile]
        if uncovered:
            raise ValueError(
                f"profile {index} gives no shapes for the dynamic inputs {uncovered} "
                f"(network shapes: { {n: inputs[n] for n in uncovered} })"
            )
        for name, (low, _opt, high) in profile.items():
            declared = inputs[name]
            if len(declared) != len(low):
                raise ValueError(f"profile {index}, input {name!r}: rank {len(low)}, but the network's is {declared}")
            for dim, want in enumerate(declared):
                if want >= 0 and not low[dim] == high[dim] == want:
                    raise ValueError(
                        f"profile {index}, input {name!r}: dimension {dim} is fixed at {want} in the "
                        f"network {declared}, but the profile spans {low[dim]}..{high[dim]}"
                    )
    return inputs


def _weak_flags(trt) -> frozenset[str]:
    return frozenset(name for name in ("FP16", "BF16") if hasattr(trt.BuilderFlag, name))


def build_engine(request: EngineRequest, log: Callable[[str], None] = print) -> Path:
    """Build ``request``'s engine and write it (atomically) to ``request.engine_path``."""
    trt = require_tensorrt()
    import torch

    say = _clock(log)
    onnx_path = request.onnx_path
    if not onnx_path.is_file():
        raise FileNotFoundError(f"no ONNX graph at {onnx_path}")
    if request.precision == "fp8":
        capability = torch.cuda.get_device_capability()
        if capability < FP8_MIN_CAPABILITY:
            raise RuntimeError(
                f"fp8 engines need a GPU of compute capability {FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} or "
                f"newer (Ada, Hopper, Blackwell); {torch.cuda.get_device_name()} is {capability[0]}.{capability[1]}: "
                "use fp16 or bf16"
            )
    plan = plan_precision(request.precision, inspect_onnx(onnx_path), _weak_flags(trt))
    say(
        f"{onnx_path.name} -> {request.engine_path.name}: {request.precision} ({plan.note}), "
        f"{'refittable, ' if request.refittable else ''}{len(request.profiles)} profile(s), TensorRT {trt.__version__}"
    )

    logger = get_logger()
    logger.take_errors()
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)  # owns the weights: kept alive until the build is done
    say(f"parsing {onnx_path} ...")
    if not parser.parse_from_file(str(onnx_path)):
        raise RuntimeError(
            f"TensorRT could not parse {onnx_path}:\n  " + "\n  ".join(_parser_errors(parser) or logger.take_errors())
        )
    inputs = _check_profiles(network, request.profiles)
    say(f"parsed {network.num_layers} layers; inputs {inputs}")

    config = builder.create_builder_config()
    for flag in plan.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if request.refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    if request.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(request.workspace_bytes))
    if request.timing_cache is not None:
        cached = request.timing_cache.read_bytes() if request.timing_cache.is_file() else b""
        cache = config.create_timing_cache(cached)
        if cache is None or not config.set_timing_cache(cache, False):  # ignore_mismatch=False
            say(f"timing cache {request.timing_cache} unusable here (other GPU or TensorRT?); starting a new one")
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, False)
        else:
            say(f"timing cache {request.timing_cache}: {len(cached)} bytes loaded")
    for index, profile_shapes in enumerate(request.profiles):
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in profile_shapes.items():
            profile.set_shape(name, low, opt, high)
        if config.add_optimization_profile(profile) < 0:
            raise RuntimeError(
                f"TensorRT rejected optimization profile {index} {profile_shapes}: " + "; ".join(logger.take_errors())
            )
    monitor = _progress_monitor(trt, say)
    if monitor is not None:
        config.progress_monitor = monitor

    say("building (this takes minutes for the full model) ...")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        errors = logger.take_errors()
        raise RuntimeError(
            f"TensorRT failed to build {request.engine_path.name} from {onnx_path}"
            + ("".join(f"\n  {e}" for e in errors[-10:]) if errors else " (no error was logged)")
        )
    if request.timing_cache is not None:
        write_atomic(request.timing_cache, config.get_timing_cache().serialize())
    write_atomic(request.engine_path, serialized)
    say(f"wrote {request.engine_path} ({request.engine_path.stat().st_size / 2**20:.1f} MiB)")
    return request.engine_path


def refit_engine(engine_path: Path, onnx_path: Path, log: Callable[[str], None] = print) -> None:
    """Give a refittable engine the weights of ``onnx_path`` (the same graph it was built from, with
    new weights, e.g. LoRAs fused in) and rewrite the plan atomically: no rebuild, no re-timing."""
    trt = require_tensorrt()
    say = _clock(log)
    engine_path, onnx_path = Path(engine_path), Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"no ONNX graph at {onnx_path}")
    logger = get_logger()
    logger.take_errors()
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise RuntimeError(
            f"TensorRT could not deserialize {engine_path} (built by another TensorRT version or "
            "for another GPU?): " + "; ".join(logger.take_errors())
        )
    say(f"refitting {engine_path.name} from {onnx_path} ...")
    count = refit_from_onnx(trt, engine, onnx_path, logger)
    write_atomic(engine_path, engine.serialize())
    say(f"refit {count} weights; wrote {engine_path} ({engine_path.stat().st_size / 2**20:.1f} MiB)")
