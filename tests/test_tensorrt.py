"""TensorRT engine builder (export/tensorrt_build.py) and runtime backend (runners/backends/tensorrt_engine.py).

Tests marked ``needs_tensorrt`` build and run real engines: they need ``tensorrt`` and a CUDA GPU and
are reported as SKIPPED, with the reason, everywhere else. The rest run everywhere: they cover what
needs no GPU (errors without TensorRT, request validation, precision planning, profile checks,
the backend wrappers over a stand-in engine, atomic writes) and prove the ONNX inputs the GPU
tests build from are valid (with ONNX Runtime).
"""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from export.tensorrt_build import EngineRequest, GraphTypes, build_engine, inspect_onnx, plan_precision, refit_engine
from runners.backends.artifacts import write_atomic
from runners.backends.tensorrt_engine import (
    TRT_TO_TORCH,
    TensorRTEngine,
    TensorRTTransformer,
    TensorRTVae,
    choose_profile,
    tensorrt_available,
    torch_dtype,
)

REPO = Path(__file__).resolve().parent.parent
INSTALL = "pip install --extra-index-url https://pypi.nvidia.com tensorrt-cu13"
AVAILABLE, REASON = tensorrt_available()
needs_tensorrt = pytest.mark.skipif(not AVAILABLE, reason=REASON)

IN, HIDDEN, OUT = 16, 32, 8
MLP_PROFILE = {"x": ((1, IN), (4, IN), (8, IN))}


# -- helpers ------------------------------------------------------------------------------------------


def mlp(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.GELU(), torch.nn.Linear(HIDDEN, OUT)).eval()


def export(module: torch.nn.Module, example: tuple, path: Path, input_names, output_names, dynamic_axes) -> Path:
    """TorchScript-based ``torch.onnx.export`` (stable initializer names, so two exports of the same
    architecture are the same graph with different weights: what refitting needs). Opset 17 spells
    GELU with Erf, which every TensorRT 10 ONNX parser reads."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            example,
            str(path),
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=dynamic_axes,
            opset_version=17,
            dynamo=False,
        )
    return path


def export_mlp(module: torch.nn.Module, path: Path) -> Path:
    return export(
        module.float().cpu(), (torch.randn(2, IN),), path, ["x"], ["y"], {"x": {0: "batch"}, "y": {0: "batch"}}
    )


class VaeDecoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents, return_dict=False)[0]


class VaeEncoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, images):
        return self.vae.encode(images).latent_dist.parameters


def without_tensorrt(monkeypatch):
    """Make ``import tensorrt`` fail as on a machine without it, even where it is installed."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


# -- everywhere: no TensorRT needed ---------------------------------------------------------------


def test_tensorrt_available_says_why_not():
    ok, reason = tensorrt_available()
    if importlib.util.find_spec("tensorrt") is None:
        assert not ok and reason.startswith("tensorrt is not installed") and INSTALL in reason
    elif not torch.cuda.is_available():
        assert not ok and "no CUDA GPU" in reason
    else:
        assert ok and reason[0].isdigit(), reason  # the version, e.g. "10.13.0.35"


def test_tensorrt_available_without_the_package(monkeypatch):
    without_tensorrt(monkeypatch)
    ok, reason = tensorrt_available()
    assert not ok and INSTALL in reason


def test_modules_import_without_tensorrt():
    code = (
        "import sys; sys.modules['tensorrt'] = None\n"
        "import runners.backends.tensorrt_engine, export.tensorrt_build\n"
        "print('imported')"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "imported" in result.stdout, result.stderr


def test_build_refit_and_load_without_tensorrt_name_the_install_command(monkeypatch, tmp_path):
    without_tensorrt(monkeypatch)
    onnx_path = export_mlp(mlp(0), tmp_path / "mlp.onnx")
    request = EngineRequest(onnx_path, tmp_path / "mlp.plan", [MLP_PROFILE], "fp16")
    with pytest.raises(RuntimeError, match="tensorrt is not installed") as error:
        build_engine(request, log=lambda _: None)
    assert INSTALL in str(error.value)
    with pytest.raises(RuntimeError, match="tensorrt is not installed") as error:
        refit_engine(tmp_path / "mlp.plan", onnx_path, log=lambda _: None)
    assert INSTALL in str(error.value)
    with pytest.raises(RuntimeError, match="tensorrt is not installed") as error:
        TensorRTEngine(tmp_path / "mlp.plan")
    assert INSTALL in str(error.value)
    assert not (tmp_path / "mlp.plan").exists()


def test_dtype_map_covers_every_dtype_the_networks_use():
    # Graph I/O dtypes of the exported networks in every precision, plus integer/bool ids and masks.
    used = [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.int8, torch.uint8, torch.bool]
    assert set(used) <= set(TRT_TO_TORCH.values())
    assert torch_dtype("FLOAT") is torch.float32 and torch_dtype("HALF") is torch.float16
    assert torch_dtype("DataType.BF16") is torch.bfloat16  # str() of a pybind11 enum member

    class Member:  # what tensorrt.DataType members look like: a .name
        name = "INT64"

    assert torch_dtype(Member()) is torch.int64
    with pytest.raises(TypeError, match="FP4"):
        torch_dtype("FP4")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason=f"tensorrt is not installed ({INSTALL})")
def test_dtype_map_matches_this_tensorrt():
    import tensorrt as trt

    for name in TRT_TO_TORCH:
        assert hasattr(trt.DataType, name), name
    sized = {name: getattr(trt.DataType, name).itemsize for name in TRT_TO_TORCH}
    for name, dtype in TRT_TO_TORCH.items():
        assert torch.empty((), dtype=dtype).element_size() == sized[name], name


def test_engine_request_is_validated(tmp_path):
    request = EngineRequest(str(tmp_path / "a.onnx"), str(tmp_path / "a.plan"), [MLP_PROFILE], "bf16", True)
    assert request.onnx_path == tmp_path / "a.onnx" and request.engine_path == tmp_path / "a.plan"
    assert request.profiles == [{"x": ((1, IN), (4, IN), (8, IN))}] and request.timing_cache is None
    bad = [
        dict(precision="int8"),
        dict(profiles=[]),
        dict(profiles=[{"x": ((2, IN), (1, IN), (8, IN))}]),  # min > opt
        dict(profiles=[{"x": ((1, IN), (4,), (8, IN))}]),  # ranks differ
        dict(profiles=[{"x": ((1, IN), (8, IN))}]),  # not (min, opt, max)
        dict(workspace_bytes=0),
    ]
    for change in bad:
        fields = dict(onnx_path=tmp_path / "a.onnx", engine_path=tmp_path / "a.plan", profiles=[MLP_PROFILE])
        with pytest.raises(ValueError):
            EngineRequest(**{**fields, **change})


def test_precision_plan():
    def plan(*args):
        chosen = plan_precision(*args)
        return chosen.strongly_typed, chosen.flags

    fp32_graph = GraphTypes(frozenset({"FLOAT"}))
    weak = frozenset({"FP16", "BF16"})
    assert plan("fp32", fp32_graph, weak) == (False, ())
    assert plan("fp16", fp32_graph, weak) == (False, ("FP16",))
    assert plan("bf16", fp32_graph, weak) == (False, ("BF16",))
    # a graph exported in the precision asked for is built strongly typed, with no precision flags
    assert plan("bf16", GraphTypes(frozenset({"FLOAT", "BFLOAT16"})), weak) == (True, ())
    assert plan("fp16", GraphTypes(frozenset({"FLOAT16"})), weak) == (True, ())
    # TensorRT 11: no weak typing, so an fp32 graph cannot become fp16/bf16 by a flag
    with pytest.raises(ValueError, match="BuilderFlag.BF16"):
        plan("bf16", fp32_graph, frozenset())
    assert plan("fp32", fp32_graph, frozenset()) == (False, ())
    # fp8 is explicit quantization only
    with pytest.raises(ValueError, match="QuantizeLinear"):
        plan("fp8", fp32_graph, weak)
    assert plan("fp8", GraphTypes(frozenset({"FLOAT", "BFLOAT16"}), quantized=True), weak) == (True, ())


def test_inspect_onnx_reads_types_and_quantization(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    assert inspect_onnx(export_mlp(mlp(0), tmp_path / "fp32.onnx")) == GraphTypes(frozenset({"FLOAT"}), False)
    half = export(
        mlp(0).half(),
        (torch.randn(2, IN, dtype=torch.float16),),
        tmp_path / "fp16.onnx",
        ["x"],
        ["y"],
        {"x": {0: "batch"}},
    )
    assert inspect_onnx(half).low_precision == {"FLOAT16"}

    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [0.5])
    zero = helper.make_tensor("zero", TensorProto.INT8, [], [0])
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["y"]),
        ],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])],
        [scale, zero],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "qdq.onnx")
    assert inspect_onnx(tmp_path / "qdq.onnx").quantized


def test_choose_profile_names_the_input_and_the_allowed_range():
    ranges = [((1, IN), (8, IN))]
    assert choose_profile("x", (1, IN), (-1, IN), ranges) == [0]
    assert choose_profile("x", (8, IN), (-1, IN), ranges) == [0]
    with pytest.raises(ValueError, match=r"'x'.*\(9, 16\).*\(1, 16\)\.\.\(8, 16\)"):
        choose_profile("x", (9, IN), (-1, IN), ranges)
    with pytest.raises(ValueError, match=r"'x'.*dimension 1 is fixed at 16"):
        choose_profile("x", (2, 15), (-1, IN), ranges)
    with pytest.raises(ValueError, match=r"'x'.*rank 2"):
        choose_profile("x", (2, IN, 1), (-1, IN), ranges)
    two = [((1, IN), (4, IN)), ((4, IN), (16, IN))]
    assert choose_profile("x", (2, IN), (-1, IN), two) == [0]
    assert choose_profile("x", (4, IN), (-1, IN), two) == [0, 1]
    assert choose_profile("x", (12, IN), (-1, IN), two) == [1]
    assert choose_profile("ids", (7, 3), (7, 3), []) == [0]  # static input: no profile needed


def test_write_atomically_replaces_whole_files_only(tmp_path):
    target = tmp_path / "sub" / "engine.plan"
    write_atomic(target, b"old")
    write_atomic(target, bytearray(b"new plan"))
    assert target.read_bytes() == b"new plan"
    with pytest.raises(TypeError):
        write_atomic(target, object())  # not a buffer: nothing written
    assert target.read_bytes() == b"new plan"
    assert sorted(p.name for p in target.parent.iterdir()) == ["engine.plan"]  # no temporary files left


class FakeEngine:
    """Stands in for TensorRTEngine: records the feed, answers like a float32 engine would."""

    def __init__(self, output_name: str, make):
        self.output_name, self.make, self.calls = output_name, make, []

    def infer(self, inputs, stream=None):
        self.calls.append(inputs)
        return {self.output_name: self.make(inputs).float()}


def test_transformer_backend_feeds_the_engine_its_inputs():
    engine = FakeEngine("velocity", lambda i: i["hidden_states"] * 2)
    transformer = TensorRTTransformer(engine, 64, True)
    assert (transformer.in_channels, transformer.guidance_embeds) == (64, True)
    kwargs = dict(
        hidden_states=torch.randn(2, 6, 64, dtype=torch.bfloat16),
        encoder_hidden_states=torch.randn(2, 5, 32),
        pooled_projections=torch.randn(2, 32),
        timestep=torch.rand(2),
        img_ids=torch.zeros(6, 3),
        txt_ids=torch.zeros(5, 3),
    )
    velocity = transformer(**kwargs, guidance=torch.full((2,), 3.5))
    assert velocity.dtype is torch.bfloat16 and velocity.shape == (2, 6, 64)  # the loop's dtype back
    assert torch.equal(velocity, kwargs["hidden_states"] * 2)
    assert set(engine.calls[-1]) == {
        "hidden_states",
        "encoder_hidden_states",
        "pooled_projections",
        "timestep",
        "img_ids",
        "txt_ids",
        "guidance",
    }
    with pytest.raises(ValueError, match="guidance"):
        transformer(**kwargs, guidance=None)
    no_guidance = TensorRTTransformer(engine, 64, False)
    no_guidance(**kwargs, guidance=None)
    assert "guidance" not in engine.calls[-1]


def test_vae_backend_uses_encoder_and_decoder_engines():
    encoder = FakeEngine("moments", lambda i: i["images"][:, :1].repeat(1, 32, 1, 1)[..., ::8, ::8])
    decoder = FakeEngine("images", lambda i: i["latents"][:, :3].repeat_interleave(8, 2).repeat_interleave(8, 3))
    vae = TensorRTVae(encoder, decoder, 16, 8, 0.3611, 0.1159)
    assert (vae.latent_channels, vae.scale_factor, vae.scaling_factor, vae.shift_factor) == (16, 8, 0.3611, 0.1159)
    images = torch.rand(2, 3, 32, 48, dtype=torch.float16)
    moments = vae.encode(images)
    assert moments.shape == (2, 32, 4, 6) and moments.dtype is torch.float16
    decoded = vae.decode(torch.randn(2, 16, 4, 6, dtype=torch.float16))
    assert decoded.shape == (2, 3, 32, 48) and decoded.dtype is torch.float16
    assert list(encoder.calls[-1]) == ["images"] and list(decoder.calls[-1]) == ["latents"]


def test_onnx_inputs_of_the_gpu_tests_are_valid(tmp_path, tiny_model):
    """What the GPU tests build engines from is right: ONNX Runtime matches torch at two batch sizes."""
    import onnxruntime as ort

    model = mlp(0)
    session = ort.InferenceSession(str(export_mlp(model, tmp_path / "mlp.onnx")), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = torch.randn(batch, IN)
        expected = model(x).detach().numpy()
        np.testing.assert_allclose(session.run(None, {"x": x.numpy()})[0], expected, atol=1e-5)
    vae = copy.deepcopy(tiny_model.pipeline.vae).float().cpu()
    decoder = ort.InferenceSession(
        str(export_vae_decoder(vae, tmp_path / "dec.onnx")), providers=["CPUExecutionProvider"]
    )
    for shape in ((1, 16, 4, 6), (2, 16, 6, 4)):
        latents = torch.randn(shape)
        with torch.no_grad():
            expected = vae.decode(latents, return_dict=False)[0].numpy()
        np.testing.assert_allclose(decoder.run(None, {"latents": latents.numpy()})[0], expected, atol=1e-4)
    encoder = ort.InferenceSession(
        str(export_vae_encoder(vae, tmp_path / "enc.onnx")), providers=["CPUExecutionProvider"]
    )
    for shape in ((1, 3, 32, 48), (3, 3, 48, 32)):
        images = torch.rand(shape) * 2 - 1
        with torch.no_grad():
            expected = vae.encode(images).latent_dist.parameters.numpy()
        np.testing.assert_allclose(encoder.run(None, {"images": images.numpy()})[0], expected, atol=1e-4)


def export_vae_decoder(vae, path: Path) -> Path:
    return export(
        VaeDecoder(vae),
        (torch.randn(1, vae.config.latent_channels, 4, 6),),
        path,
        ["latents"],
        ["images"],
        {
            "latents": {0: "batch", 2: "latent_height", 3: "latent_width"},
            "images": {0: "batch", 2: "height", 3: "width"},
        },
    )


def export_vae_encoder(vae, path: Path) -> Path:
    return export(
        VaeEncoder(vae),
        (torch.rand(1, 3, 32, 48) * 2 - 1,),
        path,
        ["images"],
        ["moments"],
        {
            "images": {0: "batch", 2: "height", 3: "width"},
            "moments": {0: "batch", 2: "latent_height", 3: "latent_width"},
        },
    )


# -- with TensorRT and a GPU ----------------------------------------------------------------------


@needs_tensorrt
@pytest.mark.parametrize("precision,tolerance", [("fp32", 1e-2), ("fp16", 3e-2)])
def test_engine_matches_torch_at_two_batch_sizes(tmp_path, precision, tolerance):
    model = mlp(0)
    lines = []
    plan = build_engine(
        EngineRequest(
            export_mlp(model, tmp_path / "mlp.onnx"),
            tmp_path / "mlp.plan",
            [MLP_PROFILE],
            precision,
            workspace_bytes=256 * 2**20,
        ),
        log=lines.append,
    )
    assert plan.is_file() and any("wrote" in line and "s]" in line for line in lines), lines
    engine = TensorRTEngine(plan)
    assert engine.input_names == ["x"] and engine.output_names == ["y"]
    assert engine.profile_range("x") == ((1, IN), (8, IN))
    model = model.cuda()
    for batch in (1, 5):
        x = torch.randn(batch, IN, device="cuda")
        y = engine.infer({"x": x})["y"]
        assert y.shape == (batch, OUT) and y.is_cuda
        torch.testing.assert_close(y.float(), model(x).detach(), atol=tolerance, rtol=tolerance)


@needs_tensorrt
def test_shape_outside_the_profile_is_a_value_error(tmp_path):
    plan = build_engine(
        EngineRequest(export_mlp(mlp(0), tmp_path / "mlp.onnx"), tmp_path / "mlp.plan", [MLP_PROFILE], "fp32"),
        log=lambda _: None,
    )
    engine = TensorRTEngine(plan)
    with pytest.raises(ValueError, match=r"'x'.*\(9, 16\).*\(1, 16\)\.\.\(8, 16\)"):
        engine.infer({"x": torch.randn(9, IN, device="cuda")})
    with pytest.raises(ValueError, match="missing"):
        engine.infer({})
    assert engine.infer({"x": torch.randn(8, IN, device="cuda")})["y"].shape == (8, OUT)  # still usable


@needs_tensorrt
def test_refit_gives_the_engine_new_weights(tmp_path):
    a, b = mlp(0), mlp(1)
    onnx_a, onnx_b = export_mlp(a, tmp_path / "a.onnx"), export_mlp(b, tmp_path / "b.onnx")
    plan = build_engine(
        EngineRequest(onnx_a, tmp_path / "mlp.plan", [MLP_PROFILE], "fp32", refittable=True), log=lambda _: None
    )
    x = torch.randn(3, IN, device="cuda")
    a, b = a.cuda(), b.cuda()
    before = TensorRTEngine(plan).infer({"x": x})["y"]
    torch.testing.assert_close(before, a(x).detach(), atol=1e-2, rtol=1e-2)

    lines = []
    refit_engine(plan, onnx_b, log=lines.append)  # rewrites the plan with b's weights
    assert any("refit" in line for line in lines)
    engine = TensorRTEngine(plan)
    after = engine.infer({"x": x})["y"]
    torch.testing.assert_close(after, b(x).detach(), atol=1e-2, rtol=1e-2)
    assert (after - before).abs().max() > 0.05  # the weights really changed

    engine.refit(onnx_a)  # in place, on the loaded engine
    torch.testing.assert_close(engine.infer({"x": x})["y"], a(x).detach(), atol=1e-2, rtol=1e-2)


@needs_tensorrt
def test_engine_built_without_refit_refuses_refit(tmp_path):
    onnx_path = export_mlp(mlp(0), tmp_path / "mlp.onnx")
    plan = build_engine(
        EngineRequest(onnx_path, tmp_path / "mlp.plan", [MLP_PROFILE], "fp32", refittable=False), log=lambda _: None
    )
    with pytest.raises(RuntimeError, match="REFIT"):
        refit_engine(plan, onnx_path, log=lambda _: None)


@needs_tensorrt
def test_timing_cache_is_written_and_reused(tmp_path):
    onnx_path = export_mlp(mlp(0), tmp_path / "mlp.onnx")
    cache = tmp_path / "timing.cache"
    build_engine(
        EngineRequest(onnx_path, tmp_path / "1.plan", [MLP_PROFILE], "fp16", timing_cache=cache), log=lambda _: None
    )
    assert cache.is_file() and cache.stat().st_size > 0
    lines = []
    build_engine(
        EngineRequest(onnx_path, tmp_path / "2.plan", [MLP_PROFILE], "fp16", timing_cache=cache), log=lines.append
    )
    assert any("bytes loaded" in line for line in lines), lines


@needs_tensorrt
def test_fp8_is_refused_clearly_for_an_unquantized_graph_or_an_old_gpu(tmp_path):
    onnx_path = export_mlp(mlp(0), tmp_path / "mlp.onnx")
    with pytest.raises((RuntimeError, ValueError), match="compute capability|QuantizeLinear"):
        build_engine(EngineRequest(onnx_path, tmp_path / "mlp.plan", [MLP_PROFILE], "fp8"), log=lambda _: None)
    assert not (tmp_path / "mlp.plan").exists()


@needs_tensorrt
def test_profile_naming_an_unknown_input_is_refused(tmp_path):
    onnx_path = export_mlp(mlp(0), tmp_path / "mlp.onnx")
    with pytest.raises(ValueError, match="not inputs of the network"):
        build_engine(
            EngineRequest(onnx_path, tmp_path / "mlp.plan", [{**MLP_PROFILE, "z": ((1,), (1,), (1,))}], "fp32"),
            log=lambda _: None,
        )


@needs_tensorrt
def test_tiny_flux_vae_through_tensorrt(tmp_path, tiny_model):
    """The tiny FLUX VAE (the true architecture) exported, built and run as the loop's VaeBackend."""
    torch_vae = copy.deepcopy(tiny_model.pipeline.vae).float().cpu().eval()
    channels = torch_vae.config.latent_channels
    decoder = build_engine(
        EngineRequest(
            export_vae_decoder(torch_vae, tmp_path / "dec.onnx"),
            tmp_path / "dec.plan",
            [{"latents": ((1, channels, 2, 2), (2, channels, 4, 6), (3, channels, 8, 8))}],
            "fp32",
        ),
        log=lambda _: None,
    )
    encoder = build_engine(
        EngineRequest(
            export_vae_encoder(torch_vae, tmp_path / "enc.onnx"),
            tmp_path / "enc.plan",
            [{"images": ((1, 3, 16, 16), (2, 3, 32, 48), (3, 3, 64, 64))}],
            "fp32",
        ),
        log=lambda _: None,
    )
    vae = TensorRTVae(
        TensorRTEngine(encoder),
        TensorRTEngine(decoder),
        channels,
        8,
        torch_vae.config.scaling_factor,
        torch_vae.config.shift_factor,
    )
    torch_vae = torch_vae.cuda()
    for batch, (height, width) in ((1, (32, 48)), (3, (48, 32))):
        latents = torch.randn(batch, channels, height // 8, width // 8, device="cuda")
        images = torch.rand(batch, 3, height, width, device="cuda") * 2 - 1
        with torch.no_grad():
            expected_images = torch_vae.decode(latents, return_dict=False)[0]
            expected_moments = torch_vae.encode(images).latent_dist.parameters
        # fp32 engines may use TF32 math (TensorRT's default), hence more than float32 tolerances
        torch.testing.assert_close(vae.decode(latents), expected_images, atol=5e-2, rtol=5e-2)
        torch.testing.assert_close(vae.encode(images), expected_moments, atol=5e-2, rtol=5e-2)
    with pytest.raises(ValueError, match="'latents'"):
        vae.decode(torch.randn(1, channels, 16, 16, device="cuda"))  # 16 > the profile's max 8


# -- everywhere: the build/refit control flow against a stand-in for the tensorrt module --------------


class FakeTensorRT:
    """A recording stand-in for the parts of ``tensorrt`` that build_engine and refit_engine call,
    shaped as TensorRT 10's Python API documents them. It proves the control flow (flags, profiles,
    timing cache, error reporting, atomic writes) where TensorRT cannot run; the real API is exercised
    by the GPU tests above."""

    __version__ = "10.0.0-fake"

    def __init__(self, parse_ok=True, build_ok=True, refittable=True, weak=("FP16", "BF16")):
        import enum
        import types

        fake = self
        self.calls = []
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=0)
        self.BuilderFlag = types.SimpleNamespace(REFIT="REFIT", **{name: name for name in weak})
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")

        class ILogger:
            Severity = enum.Enum("Severity", "INTERNAL_ERROR ERROR WARNING INFO VERBOSE")

            def __init__(self):
                pass

        class IProgressMonitor:
            def __init__(self):
                pass

        class Network:
            def __init__(self, flags):
                fake.calls.append(("create_network", flags))
                self.inputs, self.num_layers = [], 0

            @property
            def num_inputs(self):
                return len(self.inputs)

            def get_input(self, i):
                return self.inputs[i]

        class OnnxParser:
            def __init__(self, network, logger):
                self.network, self.num_errors = network, 0

            def parse_from_file(self, path):
                fake.calls.append(("parse_from_file", path))
                if not parse_ok:
                    self.num_errors = 1
                    return False
                self.network.inputs = [types.SimpleNamespace(name="x", shape=(-1, IN))]
                self.network.num_layers = 3
                return True

            def get_error(self, i):
                return types.SimpleNamespace(
                    desc=lambda: "Unsupported operator Foo", node_name=lambda: "node_7", node_operator=lambda: "Foo"
                )

        class Cache:
            def serialize(self):
                return b"timing-cache"

        class Config:
            def __init__(self):
                self.progress_monitor = None

            def set_flag(self, flag):
                fake.calls.append(("set_flag", flag))

            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("set_memory_pool_limit", pool, size))

            def create_timing_cache(self, data):
                fake.calls.append(("create_timing_cache", bytes(data)))
                return Cache()

            def set_timing_cache(self, cache, ignore_mismatch):
                return True

            def get_timing_cache(self):
                return Cache()

            def add_optimization_profile(self, profile):
                fake.calls.append(("add_optimization_profile", dict(profile.shapes)))
                return 0

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, low, opt, high):
                self.shapes[name] = (low, opt, high)

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                return Network(flags)

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                fake.calls.append(("build_serialized_network", config.progress_monitor is not None))
                return bytearray(b"serialized-plan") if build_ok else None

        class Engine:
            def __init__(self, data):
                self.data, self.refittable = data, refittable

            def serialize(self):
                return b"refit-plan"

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data):
                return Engine(data)

        class Refitter:
            def __init__(self, engine, logger):
                self.engine = engine

            def get_missing_weights(self):
                return []

            def get_all_weights(self):
                return ["0.weight", "0.bias", "2.weight", "2.bias"]

            def refit_cuda_engine(self):
                fake.calls.append(("refit_cuda_engine",))
                return True

        class OnnxParserRefitter:
            def __init__(self, refitter, logger):
                self.num_errors = 0

            def refit_from_file(self, path):
                fake.calls.append(("refit_from_file", path))
                return True

        self.ILogger, self.IProgressMonitor = ILogger, IProgressMonitor
        self.Builder, self.OnnxParser, self.Runtime = Builder, OnnxParser, Runtime
        self.Refitter, self.OnnxParserRefitter = Refitter, OnnxParserRefitter


@pytest.fixture
def fake_tensorrt(monkeypatch):
    import export.tensorrt_build as build
    import runners.backends.tensorrt_engine as backend

    def install(**options):
        fake = FakeTensorRT(**options)
        monkeypatch.setattr(build, "require_tensorrt", lambda: fake)
        monkeypatch.setattr(backend, "import_tensorrt", lambda: fake)
        monkeypatch.setattr(backend, "_LOGGER", None)  # a logger made from the stand-in, dropped afterwards
        return fake

    return install


def test_build_engine_control_flow(fake_tensorrt, tmp_path):
    fake = fake_tensorrt()
    onnx_path = export_mlp(mlp(0), tmp_path / "mlp.onnx")
    lines = []
    plan = build_engine(
        EngineRequest(
            onnx_path,
            tmp_path / "out" / "mlp.plan",
            [MLP_PROFILE, MLP_PROFILE],
            "fp16",
            refittable=True,
            workspace_bytes=1 << 30,
            timing_cache=tmp_path / "t.cache",
        ),
        log=lines.append,
    )
    assert plan.read_bytes() == b"serialized-plan" and (tmp_path / "t.cache").read_bytes() == b"timing-cache"
    assert ("create_network", 0) in fake.calls  # fp32 graph + fp16: weakly typed, BuilderFlag.FP16
    assert [c[1] for c in fake.calls if c[0] == "set_flag"] == ["FP16", "REFIT"]
    assert ("set_memory_pool_limit", "WORKSPACE", 1 << 30) in fake.calls
    assert [c[1] for c in fake.calls if c[0] == "add_optimization_profile"] == [MLP_PROFILE, MLP_PROFILE]
    assert ("build_serialized_network", True) in fake.calls  # with the progress monitor attached
    assert all(line.startswith("[TensorRT") and "s]" in line for line in lines) and len(lines) >= 4

    fake = fake_tensorrt()  # fp32: no precision flags at all
    build_engine(EngineRequest(onnx_path, tmp_path / "fp32.plan", [MLP_PROFILE], "fp32"), log=lambda _: None)
    assert not [c for c in fake.calls if c[0] == "set_flag"]


def test_build_engine_reports_parser_and_builder_errors(fake_tensorrt, tmp_path):
    onnx_path = export_mlp(mlp(0), tmp_path / "mlp.onnx")
    request = EngineRequest(onnx_path, tmp_path / "mlp.plan", [MLP_PROFILE], "fp32")
    fake_tensorrt(parse_ok=False)
    with pytest.raises(RuntimeError, match=r"could not parse.*\n.*Unsupported operator Foo \(node node_7 Foo\)"):
        build_engine(request, log=lambda _: None)
    fake_tensorrt(build_ok=False)
    with pytest.raises(RuntimeError, match="failed to build mlp.plan"):
        build_engine(request, log=lambda _: None)
    assert not request.engine_path.exists()
    fake_tensorrt()
    with pytest.raises(ValueError, match=r"profile 0 names \['y'\]"):
        build_engine(
            EngineRequest(onnx_path, tmp_path / "mlp.plan", [{**MLP_PROFILE, "y": ((1,), (1,), (1,))}], "fp32"),
            log=lambda _: None,
        )
    with pytest.raises(ValueError, match="dimension 1 is fixed at 16"):
        build_engine(
            EngineRequest(onnx_path, tmp_path / "mlp.plan", [{"x": ((1, 8), (1, 16), (1, 32))}], "fp32"),
            log=lambda _: None,
        )
    with pytest.raises(FileNotFoundError):
        build_engine(EngineRequest(tmp_path / "missing.onnx", tmp_path / "mlp.plan", [MLP_PROFILE]), log=lambda _: None)
    fake_tensorrt(weak=())  # TensorRT 11: no weak typing
    with pytest.raises(ValueError, match="BuilderFlag.BF16"):
        build_engine(EngineRequest(onnx_path, tmp_path / "mlp.plan", [MLP_PROFILE], "bf16"), log=lambda _: None)


def test_refit_engine_control_flow(fake_tensorrt, tmp_path):
    onnx_path = export_mlp(mlp(1), tmp_path / "b.onnx")
    plan = write_atomic(tmp_path / "mlp.plan", b"serialized-plan")
    fake = fake_tensorrt()
    lines = []
    refit_engine(plan, onnx_path, log=lines.append)
    assert plan.read_bytes() == b"refit-plan"
    assert [c[0] for c in fake.calls] == ["refit_from_file", "refit_cuda_engine"]
    assert any("refit 4 weights" in line for line in lines)
    fake_tensorrt(refittable=False)
    with pytest.raises(RuntimeError, match="without BuilderFlag.REFIT"):
        refit_engine(plan, onnx_path, log=lambda _: None)
    assert plan.read_bytes() == b"refit-plan"


def test_the_tensorrt_image_swaps_in_onnxruntime_with_its_cuda_provider():
    """The GPU image validates exports on the GPU and can serve FLUX_BACKEND=onnxruntime there: its
    setup script replaces the CPU-only onnxruntime with onnxruntime-gpu for torch's CUDA 13, and fails
    the image build if the CUDA provider is missing."""
    import re

    script = (REPO / "deploy" / "install-tensorrt.sh").read_text()
    assert script.index("uv pip uninstall") < script.index('"onnxruntime-gpu[cuda,cudnn]==')
    assert re.search(r"uninstall --python \S+ onnxruntime\n", script)
    assert re.search(r'"onnxruntime-gpu\[cuda,cudnn\]==1\.\d+\.\d+"', script)
    assert "'CUDAExecutionProvider' in ort.get_available_providers()" in script


def test_engines_the_disk_cannot_hold_are_refused_before_the_build(tmp_path, tiny_model, monkeypatch):
    """The engines' bytes, counted from the architecture at the engine precision, are checked
    against the target's free space (faked here) before TensorRT is asked for anything."""
    import export.disk
    import runners.backends.tensorrt_engine as backend
    from export.build import tensorrt_artifact
    from export.disk import DiskSpaceError
    from runners.backends.artifacts import Artifact
    from runners.config import Settings

    monkeypatch.setattr(backend, "tensorrt_available", lambda: (True, "10.0.0-fake"))
    monkeypatch.setattr(export.disk, "free_bytes", lambda path: 1000)
    built = []
    monkeypatch.setattr("export.tensorrt_build.build_engine", lambda *a, **k: built.append(a))
    settings = Settings.model_validate({"backend": {"engine_dir": str(tmp_path / "engines")}})
    onnx = Artifact(tmp_path / "onnx-x", {"key": "x", "files": {}})
    with pytest.raises(DiskSpaceError, match=r"needs 0\.\d\d GB \(transformer\.plan .*0\.00 GB is free"):
        tensorrt_artifact(tiny_model, settings, onnx, build=True, progress=lambda _: None)
    assert not built and not (tmp_path / "engines").exists()
