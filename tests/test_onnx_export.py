"""Tests for export/networks.py and export/onnx_export.py on the tiny FLUX model: each network
exports with dynamic axes, passes the ONNX checker, matches torch under ONNX Runtime at batch
sizes and image sizes other than the export example's, and leaves the served model as it was.

The graphs are the session's export of the tiny model (conftest's ``tiny_onnx``: the exporter's own
build, which tests/test_export.py serves from too), not a second export of the same networks."""

from __future__ import annotations

import copy
import types

import pytest
import torch

from export import onnx_export
from export.networks import SPECS, latent_image_ids
from export.onnx_export import EXPORT_BATCH, EXPORT_SIZE, check_onnx, export_onnx, float32_rope, validate

NAMES = ["transformer", "vae_encoder", "vae_decoder"]
# (batch, height, width): square and non-square, batch 1 and 3 besides the export's 2 (the export
# example is B2 64x48 with 7 text tokens; validation uses the model's 32).
SHAPES = [(1, 32, 32), (2, 64, 48), (3, 48, 64)]
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def exported(tiny_onnx):
    """{name: (onnx path, probe inputs, torch outputs before the export)}: the session's export of
    each network of ``tiny_model``, in this process, as single files (the external-data path is
    test_the_export_traces_a_meta_twin_and_copies_no_weight_before_writing's)."""
    _, artifact, before = tiny_onnx
    return {name: (artifact.file(name), *before[name]) for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_graph_interface_is_the_spec_with_symbolic_axes(exported, tiny_model, name):
    spec = SPECS[name]
    path = exported[name][0]
    summary = check_onnx(path)
    assert list(summary.inputs) == list(spec.input_names) == list(spec.inputs_for(tiny_model))
    assert list(summary.outputs) == list(spec.output_names)
    example = spec.input_shapes(tiny_model, EXPORT_BATCH, *EXPORT_SIZE, 7)
    for tensor, dims in {**summary.inputs, **summary.outputs}.items():
        axes = spec.dynamic_axes[tensor]
        for index, dim in enumerate(dims):
            if index in axes:
                assert isinstance(dim, str) and dim, f"{tensor}[{index}] ({axes[index]}) is fixed: {dims}"
            else:
                assert isinstance(dim, int) and dim > 0, f"{tensor}[{index}] should be fixed: {dims}"
        if tensor in example:
            assert len(dims) == len(example[tensor])
        if 0 in axes and axes[0] == "batch":
            assert dims[0] == "batch"
    assert summary.opset >= 18
    assert summary.float64 == 0  # float32 RoPE during the export: nothing TensorRT cannot build
    assert not (path.parent / f"{path.name}.data").exists() and summary.bytes == path.stat().st_size


@pytest.mark.parametrize("name", NAMES)
def test_onnx_runtime_matches_torch_at_other_shapes(tiny_onnx, name):
    """The export's own validation (``validate`` at ``validation_shapes``: these SHAPES for the tiny
    model, at float32's default tolerance), as its manifest records it."""
    _, artifact, _ = tiny_onnx
    rows = [onnx_export.ValidationRow(**row) for row in artifact.manifest["files"][name]["validation"]]
    assert [row.shape for row in rows] == ["B1 32x32", "B2 48x64", "B3 64x48"]
    for row in rows:
        print(f"{row.network} {row.shape}: max abs {row.max_abs:.2e} max rel {row.max_rel:.2e}")
        assert row.ok and not row.error and row.provider == "CPUExecutionProvider", row
        assert 0 <= row.max_abs <= TOLERANCE and row.tolerance == TOLERANCE


@pytest.mark.parametrize("name", NAMES)
def test_export_leaves_the_model_unchanged(exported, tiny_model, name):
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    spec = SPECS[name]
    _, probe, before = exported[name]
    with torch.inference_mode():
        after = spec.module(tiny_model)(*probe)
    assert torch.equal(before, after)
    transformer = tiny_model.pipeline.transformer
    assert not transformer.training and not tiny_model.pipeline.vae.training
    assert all(p.dtype == torch.float32 for p in transformer.parameters())
    assert all("forward" not in vars(m) for m in transformer.modules() if isinstance(m, FluxPosEmbed))


def test_float32_rope_is_patched_per_instance_and_removed(tiny_model):
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    transformer = tiny_model.pipeline.transformer
    ids = latent_image_ids(4, 3)
    with torch.inference_mode():
        cos64, _ = transformer.pos_embed(ids)
        with float32_rope(transformer) as patched:
            assert patched == 1 and "forward" in vars(transformer.pos_embed)
            cos32, _ = transformer.pos_embed(ids)
        assert "forward" not in vars(transformer.pos_embed)
        assert FluxPosEmbed.forward is not onnx_export._rope_float32_forward
        again, _ = transformer.pos_embed(ids)
    assert torch.equal(again, cos64)
    torch.testing.assert_close(cos32, cos64, rtol=0, atol=1e-6)


def test_a_wrong_graph_fails_validation(exported, tiny_model):
    # The encoder's graph against the decoder's contract: its inputs are not the spec's.
    rows = validate(SPECS["vae_decoder"], tiny_model, exported["vae_encoder"][0], SHAPES[:2], 32, TOLERANCE)
    assert rows and not any(row.ok for row in rows)
    assert all("graph inputs" in row.error for row in rows)
    # The right interface but other weights: a torch model changed after the export.
    vae = copy.deepcopy(tiny_model.pipeline.vae)
    with torch.no_grad():
        vae.encoder.conv_out.bias.add_(0.05)
    changed = types.SimpleNamespace(pipeline=types.SimpleNamespace(vae=vae))
    rows = validate(SPECS["vae_encoder"], changed, exported["vae_encoder"][0], SHAPES, 32, TOLERANCE)
    assert not any(row.ok for row in rows)
    assert all(row.error == "" and row.max_abs > TOLERANCE for row in rows)


def test_sample_inputs_have_the_loop_shapes_and_dtypes(tiny_model):
    spec = SPECS["transformer"]
    inputs = dict(zip(spec.inputs_for(tiny_model), spec.sample_inputs(tiny_model, 3, 64, 48, 5), strict=True))
    assert {k: tuple(v.shape) for k, v in inputs.items()} == {
        "hidden_states": (3, 12, 64),
        "encoder_hidden_states": (3, 5, 32),
        "pooled_projections": (3, 32),
        "timestep": (3,),
        "img_ids": (12, 3),
        "txt_ids": (5, 3),
        "guidance": (3,),
    }
    assert all(v.dtype == torch.float32 for v in inputs.values())
    assert torch.equal(inputs["img_ids"][:, 1:], latent_image_ids(4, 3)[:, 1:])
    assert 0 <= inputs["timestep"].min() and inputs["timestep"].max() <= 1
    (images,) = SPECS["vae_encoder"].sample_inputs(tiny_model, 2, 64, 48, 5)
    assert images.shape == (2, 3, 64, 48) and -1 <= images.min() and images.max() <= 1
    (latents,) = SPECS["vae_decoder"].sample_inputs(tiny_model, 2, 64, 48, 5)
    assert latents.shape == (2, 16, 8, 6)
    with pytest.raises(ValueError, match="multiples of 16"):
        spec.sample_inputs(tiny_model, 1, 40, 32, 5)


def test_profiles_cover_the_configured_sizes_and_batches(tiny_model):
    sizes = [(64, 48), (32, 32), (48, 64), (96, 32)]  # (height, width); the first is opt
    for name in NAMES:
        profile = SPECS[name].profile(tiny_model, sizes, [1, 4], 32)
        assert list(profile) == list(SPECS[name].inputs_for(tiny_model))
        for shapes in profile.values():
            low, opt, high = shapes
            assert len(low) == len(opt) == len(high)
            assert all(a <= b <= c for a, b, c in zip(low, opt, high, strict=True)), (name, shapes)
    transformer = SPECS["transformer"].profile(tiny_model, sizes, [1, 4], 32)
    assert transformer["hidden_states"] == ((1, 4, 64), (4, 12, 64), (4, 12, 64))
    assert transformer["img_ids"] == ((4, 3), (12, 3), (12, 3))
    assert transformer["encoder_hidden_states"] == ((1, 32, 32), (4, 32, 32), (4, 32, 32))
    assert transformer["txt_ids"] == ((32, 3),) * 3
    assert transformer["guidance"] == ((1,), (4,), (4,))
    encoder = SPECS["vae_encoder"].profile(tiny_model, sizes, [1, 4], 32)
    assert encoder["images"] == ((1, 3, 32, 32), (4, 3, 64, 48), (4, 3, 96, 64))
    decoder = SPECS["vae_decoder"].profile(tiny_model, sizes, [2], 32)
    assert decoder["latents"] == ((2, 16, 4, 4), (2, 16, 8, 6), (2, 16, 12, 8))


def test_a_model_without_guidance_embeds_has_no_guidance_input(tiny_model):
    config = dict(tiny_model.pipeline.transformer.config)
    config["guidance_embeds"] = False
    no_guidance = types.SimpleNamespace(
        pipeline=types.SimpleNamespace(transformer=types.SimpleNamespace(config=types.SimpleNamespace(**config)))
    )
    spec = SPECS["transformer"]
    assert spec.inputs_for(no_guidance) == spec.input_names[:-1]
    assert "guidance" not in spec.profile(no_guidance, [(32, 32)], [1], 8)
    assert "guidance" not in spec.input_shapes(no_guidance, 1, 32, 32, 8)


def test_the_export_traces_a_meta_twin_and_copies_no_weight_before_writing(exported, tiny_model, tmp_path, monkeypatch):
    """The exporter traces a storage-less twin; each live weight is read once, while the file is
    written (none before: no copy of the network), and the served model is left as it was. The
    graph goes through the external-data path (threshold lowered to 0): its weights in a ``.data``
    file beside it, which the checker and ONNX Runtime read through the ``.onnx``."""
    from export.onnx_export import live_tensors, meta_twin

    vae = tiny_model.pipeline.vae
    twin = meta_twin(SPECS["vae_decoder"].module(tiny_model), torch.float32)
    assert all(t.is_meta and t.dtype == torch.float32 for t in live_tensors(twin).values())
    assert all(not t.is_meta for t in vae.parameters())
    half = meta_twin(SPECS["vae_decoder"].module(tiny_model), torch.bfloat16)  # the twin's dtype is its own
    assert {t.dtype for t in half.parameters()} == {torch.bfloat16}

    events = []
    real_weight = onnx_export._host_weight
    monkeypatch.setattr(
        onnx_export, "_host_weight", lambda *a, **k: events.append((a[2], a[0].numel())) or real_weight(*a, **k)
    )
    real_save = torch.onnx.ONNXProgram.save
    monkeypatch.setattr(
        torch.onnx.ONNXProgram, "save", lambda self, *a, **k: events.append("save") or real_save(self, *a, **k)
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
        path = export_onnx(SPECS["vae_decoder"], tiny_model, tmp_path / "vae_decoder.onnx")
    before, after = events[: events.index("save")], events[events.index("save") + 1 :]
    # Before the save only the optimizer's constant folding reads weights, and only small ones (its
    # input limit: norms' scales and biases, which it folds into the graph); every large one is made
    # while it is written, once.
    assert all(size <= 8192 for _, size in before), before
    assert len(after) > 10 and len(set(after)) == len(after)
    assert all(t.dtype == torch.float32 and not t.is_meta for t in vae.parameters())

    summary, single_file = check_onnx(path), check_onnx(exported["vae_decoder"][0])
    assert (path.parent / f"{path.name}.data").exists() and summary.bytes > path.stat().st_size
    assert (summary.inputs, summary.outputs) == (single_file.inputs, single_file.outputs)  # the same interface
    (row,) = validate(SPECS["vae_decoder"], tiny_model, path, SHAPES[2:], 32, TOLERANCE)
    assert row.ok and not row.error, row


def test_validation_runs_torch_first_and_frees_its_session_before_returning(exported, tiny_model, monkeypatch):
    """The torch outputs exist before ONNX Runtime loads the graph, and the session is gone (not just
    unreferenced by the caller) once validate returns: the next network's export never shares memory
    with it."""
    import dataclasses
    import gc
    import weakref

    events, sessions = [], []
    real_session = onnx_export.ort_session

    def session(path, device="cpu"):
        events.append(("session", str(device)))
        made = real_session(path, device)
        sessions.append(weakref.ref(made))
        return made

    class Recording(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *inputs):
            events.append(("torch",))
            return self.inner(*inputs)

    @dataclasses.dataclass(frozen=True)
    class RecordingSpec(type(SPECS["vae_decoder"])):
        def module(self, model):
            return Recording(super().module(model))

    spec = RecordingSpec(
        **{f.name: getattr(SPECS["vae_decoder"], f.name) for f in dataclasses.fields(SPECS["vae_decoder"])}
    )
    monkeypatch.setattr(onnx_export, "ort_session", session)
    rows = validate(spec, tiny_model, exported["vae_decoder"][0], SHAPES[:2], 32, TOLERANCE)
    assert all(row.ok and row.provider == "CPUExecutionProvider" for row in rows)
    assert events == [("torch",), ("torch",), ("session", "cpu")]  # on the model's device's provider
    gc.collect()
    assert len(sessions) == 1 and sessions[0]() is None


def test_validation_shapes_are_the_profiles_smallest_for_full_size_models():
    from export.build import validation_shapes
    from runners.config import Settings

    full = Settings.model_validate(
        {
            "model": {"model": "random:flux-dev"},
            "backend": {"export_sizes": ["1024x1024", "512x512", "768x1024"], "export_batch_sizes": [4, 1, 2]},
        }
    )
    assert validation_shapes(full) == [(1, 512, 512)]
    assert validation_shapes(Settings()) == [(1, 32, 32), (2, 64, 48), (3, 48, 64)]  # the tiny model: cheap, several
