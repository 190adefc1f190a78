"""The loop's two interfaces (``runners.backends``) over serialized TensorRT engines.

Written against TensorRT 10's documented Python API (the named-tensor API: no bindings):

- ``trt.Runtime(logger).deserialize_cuda_engine(plan)`` and ``ICudaEngine.create_execution_context()``
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Runtime.html
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Engine.html
- ``ICudaEngine.num_io_tensors / get_tensor_name / get_tensor_mode / get_tensor_dtype / get_tensor_shape /
  get_tensor_profile_shape / num_optimization_profiles`` (Engine.html above);
- ``IExecutionContext.set_input_shape / get_tensor_shape / set_tensor_address / execute_async_v3`` and
  ``set_optimization_profile_async``
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/ExecutionContext.html
- ``trt.Refitter`` + ``trt.OnnxParserRefitter.refit_from_file`` for refitting weights from an ONNX file
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Refitter.html
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/c-api/classnvonnxparser_1_1_i_parser_refitter.html
  https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/refitting-engines.html

Tensors cross as torch CUDA tensors (no host copies): inputs are made contiguous, on the engine's
device, in the dtype the engine declares for them; outputs are allocated by torch once the input
shapes are set, and handed back to the loop in the dtype it passed in. ``tensorrt`` is imported
only when an engine is loaded, so this module imports on machines without it.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "pip install --extra-index-url https://pypi.nvidia.com tensorrt-cu13; "
    "take the tensorrt-cu* package matching torch's CUDA major version"
)

# TensorRT DataType member name -> torch dtype, for every type a network input or output can have.
# Members as documented for tensorrt.DataType (TensorRT 10):
# https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/FoundationalTypes/DataType.html
# (INT4, FP4 and E8M0 are weight/quantisation-only types with no torch equivalent; never network I/O here.)
TRT_TO_TORCH: dict[str, torch.dtype] = {
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "BF16": torch.bfloat16,
    "INT8": torch.int8,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "FP8": torch.float8_e4m3fn,  # "1 sign bit, 4 exponent bits, 3 mantissa bits, and exponent-bias 7"
}


def torch_dtype(trt_dtype: Any) -> torch.dtype:
    """The torch dtype of a ``tensorrt.DataType`` (or of its member name, e.g. ``"HALF"``)."""
    name = trt_dtype if isinstance(trt_dtype, str) else getattr(trt_dtype, "name", str(trt_dtype))
    name = name.rsplit(".", 1)[-1]
    try:
        return TRT_TO_TORCH[name]
    except KeyError:
        raise TypeError(f"TensorRT data type {name} has no torch equivalent this backend supports") from None


def import_tensorrt():
    """``import tensorrt``, or a RuntimeError naming the install command."""
    try:
        import tensorrt
    except Exception as exc:  # ImportError, or OSError when libnvinfer cannot be loaded
        raise RuntimeError(f"tensorrt is not installed ({INSTALL_HINT}): {exc}") from exc
    return tensorrt


# -- logging -------------------------------------------------------------------------------------

_LOGGER = None
_LOGGER_LOCK = threading.Lock()


def get_logger():
    """One process-wide ``trt.ILogger`` (TensorRT 8 documented the logger as a singleton that every
    Builder/Runtime must share; one instance is the safe reading for every version). It forwards
    TensorRT's messages to Python logging and keeps the recent errors, so a failure can say why.

    Custom loggers subclass ``trt.ILogger`` and call its ``__init__`` explicitly, as documented:
    https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Logger.html
    """
    global _LOGGER
    with _LOGGER_LOCK:
        if _LOGGER is None:
            trt = import_tensorrt()

            class CapturingLogger(trt.ILogger):
                def __init__(self):
                    trt.ILogger.__init__(self)
                    self._errors: deque[str] = deque(maxlen=64)
                    self._lock = threading.Lock()
                    self._levels = {
                        trt.ILogger.Severity.INTERNAL_ERROR: logging.CRITICAL,
                        trt.ILogger.Severity.ERROR: logging.ERROR,
                        trt.ILogger.Severity.WARNING: logging.WARNING,
                        trt.ILogger.Severity.INFO: logging.DEBUG,
                        trt.ILogger.Severity.VERBOSE: logging.DEBUG,
                    }

                def log(self, severity, msg):
                    level = self._levels.get(severity, logging.INFO)
                    if level < logging.WARNING and not log.isEnabledFor(level):
                        return  # the builder's INFO/VERBOSE stream, cheaply dropped
                    if level >= logging.ERROR:
                        with self._lock:
                            self._errors.append(msg)
                    log.log(level, "TensorRT: %s", msg)

                def take_errors(self) -> list[str]:
                    """The errors logged since the last call (and forget them)."""
                    with self._lock:
                        errors = list(self._errors)
                        self._errors.clear()
                    return errors

            _LOGGER = CapturingLogger()
        return _LOGGER


def _with_errors(message: str, errors: list[str]) -> str:
    return message + ("".join(f"\n  {e}" for e in errors[-8:]) if errors else "")


# -- shapes ----------------------------------------------------------------------------------------

Shape = tuple[int, ...]


def fits(shape: Shape, low: Shape, high: Shape) -> bool:
    return len(shape) == len(low) == len(high) and all(lo <= s <= hi for s, lo, hi in zip(shape, low, high))


def choose_profile(name: str, shape: Shape, engine_shape: Shape, ranges: list[tuple[Shape, Shape]]) -> list[int]:
    """The optimization profiles (indices into ``ranges``, each a (min, max) pair) that accept
    ``shape`` for input ``name``; a ValueError naming the input and the allowed range when none does.
    ``engine_shape`` is the engine's declared shape, -1 where a dimension is dynamic."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(engine_shape):
        raise ValueError(
            f"input {name!r} has shape {shape}; the engine takes rank {len(engine_shape)}: {tuple(engine_shape)}"
        )
    for dim, (got, want) in enumerate(zip(shape, engine_shape)):
        if want >= 0 and got != want:
            raise ValueError(
                f"input {name!r} has shape {shape}; the engine's dimension {dim} is fixed at {want} "
                f"(engine shape {tuple(engine_shape)})"
            )
    if all(d >= 0 for d in engine_shape):
        return list(range(len(ranges))) or [0]
    matching = [i for i, (low, high) in enumerate(ranges) if fits(shape, low, high)]
    if not matching:
        allowed = " or ".join(f"{tuple(low)}..{tuple(high)}" for low, high in ranges)
        raise ValueError(
            f"input {name!r} has shape {shape}, outside the engine's optimization profile: "
            f"allowed {allowed} (per dimension, min..max); rebuild the engine with a profile covering it"
        )
    return matching


# -- refit -------------------------------------------------------------------------------------------


def refit_from_onnx(trt, engine, onnx_path: Path, logger) -> int:
    """Refit a deserialized, refittable ``engine`` in place from an ONNX file with the same graph and
    new weights (e.g. LoRAs fused in). Returns how many refittable weights the engine has.

    The documented sequence: ``trt.Refitter(engine, logger)``, ``trt.OnnxParserRefitter(refitter,
    logger).refit_from_file(path)`` (it sets every weight the ONNX model names, loading external data
    next to the file), no ``get_missing_weights()`` left, then ``refitter.refit_cuda_engine()``."""
    if not getattr(engine, "refittable", True):
        raise RuntimeError(
            "the engine was built without BuilderFlag.REFIT, so its weights cannot be refit; "
            "rebuild it with refittable=True"
        )
    logger.take_errors()
    refitter = trt.Refitter(engine, logger)
    parser_refitter = trt.OnnxParserRefitter(refitter, logger)
    if not parser_refitter.refit_from_file(str(onnx_path)):
        details = [_parser_error_text(parser_refitter.get_error(i)) for i in range(parser_refitter.num_errors)]
        raise RuntimeError(
            _with_errors(
                f"TensorRT could not refit weights from {onnx_path} (is it the same graph the engine was built from?)",
                details + logger.take_errors(),
            )
        )
    missing = list(refitter.get_missing_weights())
    if missing:
        raise RuntimeError(f"refit from {onnx_path} left {len(missing)} weights unset, e.g. {missing[:5]}")
    if not refitter.refit_cuda_engine():
        raise RuntimeError(_with_errors(f"refit_cuda_engine() failed for {onnx_path}", logger.take_errors()))
    return len(refitter.get_all_weights())


def _parser_error_text(error) -> str:
    """A parser error's description, with the ONNX node when the binding exposes it (``desc()``,
    ``node_name()``, ``node_operator()`` per nvonnxparser::IParserError)."""
    try:
        text = error.desc()
    except Exception:
        return str(error)
    where = []
    for attribute in ("node_name", "node_operator"):
        try:
            value = getattr(error, attribute)()
        except Exception:
            value = None
        if value:
            where.append(str(value))
    return f"{text} (node {' '.join(where)})" if where else str(text)


# -- engine ----------------------------------------------------------------------------------------


class TensorRTEngine:
    """One deserialized engine and one execution context on one CUDA device.

    ``infer`` is serialised by a lock: the context holds the shapes and addresses of one call."""

    def __init__(self, engine_path: Path, device: str | torch.device = "cuda"):
        trt = import_tensorrt()
        self._trt = trt
        self.path = Path(engine_path)
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"TensorRT engines run on a CUDA device, not {self.device}")
        if not torch.cuda.is_available():
            raise RuntimeError("TensorRT engines need a CUDA GPU, and torch sees none")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._logger = get_logger()
        self._logger.take_errors()
        self._lock = threading.Lock()
        with torch.cuda.device(self.device):
            self._runtime = trt.Runtime(self._logger)
            self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self.engine is None:
                raise RuntimeError(
                    _with_errors(
                        f"TensorRT could not deserialize {self.path}: engines only load on the TensorRT version and "
                        "GPU model they were built with; rebuild it here",
                        self._logger.take_errors(),
                    )
                )
            self.context = self.engine.create_execution_context()
            if self.context is None:
                raise RuntimeError(
                    _with_errors(
                        f"could not create an execution context for {self.path} (out of GPU memory?)",
                        self._logger.take_errors(),
                    )
                )
            self._stream = torch.cuda.Stream(device=self.device)
        self._profile = 0
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}
        self.shapes = {n: tuple(self.engine.get_tensor_shape(n)) for n in names}
        profiles = max(1, int(getattr(self.engine, "num_optimization_profiles", 1)))
        # (min, max) per profile for each input with a dynamic dimension; get_tensor_profile_shape
        # returns [min, opt, max] for the input in the given profile.
        self.ranges: dict[str, list[tuple[Shape, Shape]]] = {}
        for name in self.input_names:
            if any(d < 0 for d in self.shapes[name]):
                self.ranges[name] = []
                for p in range(profiles):
                    low, _opt, high = self.engine.get_tensor_profile_shape(name, p)
                    self.ranges[name].append((tuple(low), tuple(high)))
        log.info(
            "TensorRT engine %s: inputs %s, outputs %s, %d profile(s)",
            self.path.name,
            {n: (self.shapes[n], str(self.dtypes[n])) for n in self.input_names},
            self.output_names,
            profiles,
        )

    def profile_range(self, name: str, profile: int = 0) -> tuple[Shape, Shape]:
        """(min, max) shape the engine accepts for input ``name`` in ``profile``."""
        if name in self.ranges:
            return self.ranges[name][profile]
        return self.shapes[name], self.shapes[name]

    def _select_profile(self, inputs: dict[str, torch.Tensor]) -> int:
        candidates = None
        for name, tensor in inputs.items():
            ranges = self.ranges.get(name, [])
            matching = set(choose_profile(name, tuple(tensor.shape), self.shapes[name], ranges))
            if ranges:
                candidates = matching if candidates is None else candidates & matching
        if candidates is None:
            return self._profile
        if not candidates:
            raise ValueError(
                f"no single optimization profile of {self.path.name} accepts all these input shapes: "
                + ", ".join(f"{n}={tuple(t.shape)}" for n, t in inputs.items())
            )
        return self._profile if self._profile in candidates else min(candidates)

    def infer(
        self, inputs: dict[str, torch.Tensor], stream: torch.cuda.Stream | None = None
    ) -> dict[str, torch.Tensor]:
        """Run the engine on ``inputs`` (name -> tensor) and return its outputs (name -> new tensor on
        the engine's device, in the engine's dtype). Shapes outside the engine's profiles raise
        ValueError before anything runs."""
        unexpected = sorted(set(inputs) - set(self.input_names))
        missing = sorted(set(self.input_names) - set(inputs))
        if unexpected or missing:
            raise ValueError(
                f"{self.path.name} takes inputs {self.input_names}; missing {missing}, unexpected {unexpected}"
            )
        with self._lock, torch.cuda.device(self.device):
            profile = self._select_profile(inputs)
            stream = stream or self._stream
            # Conversions run on the caller's stream; the engine's stream waits for them below.
            feeds = {
                name: inputs[name].to(device=self.device, dtype=self.dtypes[name]).contiguous()
                for name in self.input_names
            }
            stream.wait_stream(torch.cuda.current_stream(self.device))
            if profile != self._profile:
                if not self.context.set_optimization_profile_async(profile, stream.cuda_stream):
                    raise RuntimeError(f"could not switch {self.path.name} to optimization profile {profile}")
                self._profile = profile
            for name, tensor in feeds.items():
                if not self.context.set_input_shape(name, tuple(tensor.shape)):
                    raise ValueError(
                        _with_errors(
                            f"TensorRT rejected shape {tuple(tensor.shape)} for input {name!r}",
                            self._logger.take_errors(),
                        )
                    )
                self.context.set_tensor_address(name, tensor.data_ptr())
            outputs = {}
            for name in self.output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise RuntimeError(
                        f"output {name!r} has data-dependent shape {shape}; this backend needs shapes "
                        "known from the inputs"
                    )
                outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
                self.context.set_tensor_address(name, outputs[name].data_ptr())
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError(
                    _with_errors(f"TensorRT execution of {self.path.name} failed", self._logger.take_errors())
                )
            # feeds stay referenced until the work that reads them is done.
            stream.synchronize()
            del feeds
        return outputs

    def refit(self, onnx_path: Path) -> None:
        """Refit this loaded engine's weights in place from ``onnx_path`` (same graph, new weights)."""
        with self._lock, torch.cuda.device(self.device):
            torch.cuda.synchronize(self.device)
            count = refit_from_onnx(self._trt, self.engine, Path(onnx_path), self._logger)
            # A fresh context, so nothing cached from the old weights can outlive the refit.
            context = self.engine.create_execution_context()
            if context is None:
                raise RuntimeError(
                    _with_errors(
                        f"could not recreate the execution context of {self.path} after refit",
                        self._logger.take_errors(),
                    )
                )
            self.context, self._profile = context, 0
        log.info("refit %s from %s (%d refittable weights)", self.path.name, onnx_path, count)


def _engine(engine: TensorRTEngine | Path | str) -> TensorRTEngine:
    return engine if not isinstance(engine, (str, Path)) else TensorRTEngine(Path(engine))


def _single_output(engine: TensorRTEngine, name: str | None) -> str:
    if name is not None:
        return name
    if len(engine.output_names) != 1:
        raise ValueError(f"{engine.path.name} has outputs {engine.output_names}: name the one to return")
    return engine.output_names[0]


class TensorRTTransformer:
    """``TransformerBackend`` over an engine with the transformer's inputs (hidden_states,
    encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids and, when the model embeds
    guidance, guidance) and its output ``velocity``."""

    def __init__(
        self,
        engine: TensorRTEngine | Path | str,
        in_channels: int,
        guidance_embeds: bool,
        output_name: str = "velocity",
    ):
        self.engine = _engine(engine)
        self.in_channels = int(in_channels)
        self.guidance_embeds = bool(guidance_embeds)
        self.output_name = output_name

    def __call__(
        self, *, hidden_states, encoder_hidden_states, pooled_projections, timestep, guidance, img_ids, txt_ids
    ):
        inputs = {
            "hidden_states": hidden_states,
            "encoder_hidden_states": encoder_hidden_states,
            "pooled_projections": pooled_projections,
            "timestep": timestep,
            "img_ids": img_ids,
            "txt_ids": txt_ids,
        }
        if guidance is not None:
            inputs["guidance"] = guidance
        elif self.guidance_embeds:
            raise ValueError("this transformer embeds guidance: pass guidance (B,) float32")
        velocity = self.engine.infer(inputs)[self.output_name]
        return velocity.to(device=hidden_states.device, dtype=hidden_states.dtype)


class TensorRTVae:
    """``VaeBackend`` over two engines: the encoder (images -> moments) and the decoder
    (latents -> images)."""

    def __init__(
        self,
        encoder: TensorRTEngine | Path | str,
        decoder: TensorRTEngine | Path | str,
        latent_channels: int,
        scale_factor: int,
        scaling_factor: float,
        shift_factor: float,
        *,
        encoder_input: str = "images",
        encoder_output: str = "moments",
        decoder_input: str = "latents",
        decoder_output: str = "images",
    ):
        self.encoder = _engine(encoder)
        self.decoder = _engine(decoder)
        self.latent_channels = int(latent_channels)
        self.scale_factor = int(scale_factor)
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = float(shift_factor or 0.0)
        self.names = (encoder_input, encoder_output, decoder_input, decoder_output)

    def encode(self, images):
        moments = self.encoder.infer({self.names[0]: images})[self.names[1]]
        return moments.to(device=images.device, dtype=images.dtype)

    def decode(self, latents):
        images = self.decoder.infer({self.names[2]: latents})[self.names[3]]
        return images.to(device=latents.device, dtype=latents.dtype)


def tensorrt_available() -> tuple[bool, str]:
    """(True, TensorRT's version) when ``import tensorrt`` works and torch sees a CUDA GPU, else
    (False, why not)."""
    try:
        import tensorrt
    except Exception as exc:  # ImportError, or OSError when libnvinfer is missing
        return False, f"tensorrt is not installed ({INSTALL_HINT}): {type(exc).__name__}: {exc}"
    import torch

    if not torch.cuda.is_available():
        return False, f"no CUDA GPU (tensorrt {tensorrt.__version__} is installed, but torch sees no GPU)"
    return True, str(tensorrt.__version__)
