"""Tests for runners/lora/formats.py: three LoRA layouts read into one form, doubtful files refused.

LoRA files are built here for the tiny model (random tensors, fixed seeds), written with
safetensors and read back through ``load_lora``. The BFL -> diffusers mapping below is this test's
own copy (checked against diffusers' ``_convert_sd_scripts_to_ai_toolkit``), so a slip in the
module's table shows up as a mismatch rather than agreeing with itself.
"""

from __future__ import annotations

import io
import pickle
import re
import struct
import zipfile

import pytest
import torch
from safetensors.torch import save, save_file

from runners.lora import formats as lora_formats
from runners.lora.formats import LoraError, LoraWeights, linear_shapes, load_lora, parse_lora, read_safetensors

R = 4  # rank of the LoRAs built here

# BFL layer suffix -> diffusers modules (relative to the block), as in diffusers' converter.
DOUBLE = {
    "img_attn_qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "img_attn_proj": ["attn.to_out.0"],
    "img_mlp_0": ["ff.net.0.proj"],
    "img_mlp_2": ["ff.net.2"],
    "img_mod_lin": ["norm1.linear"],
    "txt_attn_qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "txt_attn_proj": ["attn.to_add_out"],
    "txt_mlp_0": ["ff_context.net.0.proj"],
    "txt_mlp_2": ["ff_context.net.2"],
    "txt_mod_lin": ["norm1_context.linear"],
}
SINGLE = {
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    "linear2": ["proj_out"],
    "modulation_lin": ["norm.linear"],
}
# BFL layer suffix -> XLabs processor name (XLabs covers attention only).
XLABS_DOUBLE = {
    "img_attn_qkv": "qkv_lora1",
    "img_attn_proj": "proj_lora1",
    "txt_attn_qkv": "qkv_lora2",
    "txt_attn_proj": "proj_lora2",
}

FLUX_DEV_CONFIG = dict(
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    in_channels=64,
)


@pytest.fixture(scope="module")
def transformer(tiny_model):
    return tiny_model.pipeline.transformer


@pytest.fixture(scope="module")
def shapes(transformer):
    return linear_shapes(transformer)


def rand(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def bfl_layers(shapes, blocks=(0, 1), singles=(0, 1), names=None) -> dict[str, tuple[str, list[str]]]:
    """BFL layer name (``double_blocks_0_img_attn_qkv``) -> its diffusers target modules."""
    out = {}
    for i in blocks:
        for suffix, targets in DOUBLE.items():
            out[f"double_blocks_{i}_{suffix}"] = [f"transformer_blocks.{i}.{t}" for t in targets]
    for i in singles:
        for suffix, targets in SINGLE.items():
            out[f"single_blocks_{i}_{suffix}"] = [f"single_transformer_blocks.{i}.{t}" for t in targets]
    return {k: v for k, v in out.items() if names is None or k in names}


def random_pairs(layers, shapes, seed=0) -> dict[str, tuple[torch.Tensor, torch.Tensor, list[int]]]:
    """Per BFL layer: a down (R, in), a fused up (sum of outs, R), and the outs of its targets."""
    pairs = {}
    for n, (name, targets) in enumerate(sorted(layers.items())):
        outs = [shapes[t][1] for t in targets]
        down = rand(R, shapes[targets[0]][0], seed=seed + 2 * n)
        pairs[name] = (down, rand(sum(outs), R, seed=seed + 2 * n + 1), outs)
    return pairs


def kohya_file(pairs, alpha=None) -> dict[str, torch.Tensor]:
    sd = {}
    for name, (down, up, _) in pairs.items():
        sd[f"lora_unet_{name}.lora_down.weight"] = down.clone()
        sd[f"lora_unet_{name}.lora_up.weight"] = up.clone()
        if alpha is not None:
            sd[f"lora_unet_{name}.alpha"] = torch.tensor(float(alpha))
    return sd


def diffusers_file(
    pairs, layers, alpha=None, prefix="transformer.", down_key="lora_A.weight", up_key="lora_B.weight"
) -> dict[str, torch.Tensor]:
    sd = {}
    for name, (down, up, outs) in pairs.items():
        for target, part in zip(layers[name], torch.split(up, outs)):
            sd[f"{prefix}{target}.{down_key}"] = down.clone()  # safetensors refuses shared tensors
            sd[f"{prefix}{target}.{up_key}"] = part.clone()
            if alpha is not None:
                sd[f"{prefix}{target}.alpha"] = torch.tensor(float(alpha))
    return sd


def deltas(weights: LoraWeights) -> dict[str, torch.Tensor]:
    return {m: layer.multiplier * layer.up @ layer.down for m, layer in weights.layers.items()}


def assert_same_deltas(a: LoraWeights, b: LoraWeights):
    da, db = deltas(a), deltas(b)
    assert sorted(da) == sorted(db)
    for module in da:
        torch.testing.assert_close(da[module], db[module], rtol=1e-6, atol=1e-6, msg=module)


def refused(tensors, transformer, max_rank=128) -> str:
    with pytest.raises(LoraError) as info:
        load_lora(save(tensors), transformer, max_rank)
    return str(info.value)


# ----------------------------------------------------------------------------------------------- formats


def test_linear_shapes_of_the_tiny_model(shapes):
    assert shapes["transformer_blocks.0.attn.to_q"] == (32, 32)
    assert shapes["transformer_blocks.1.norm1.linear"] == (32, 192)
    assert shapes["single_transformer_blocks.1.proj_mlp"] == (32, 128)
    assert shapes["single_transformer_blocks.0.proj_out"] == (160, 32)
    assert all(isinstance(v, tuple) and len(v) == 2 for v in shapes.values())


def test_kohya_maps_every_block_layer_and_splits_fused_ones(transformer, shapes, tmp_path):
    layers = bfl_layers(shapes)
    pairs = random_pairs(layers, shapes)
    path = tmp_path / "kohya.safetensors"
    save_file(kohya_file(pairs), path)
    weights = load_lora(path, transformer, max_rank=128)

    assert weights.format == "kohya"
    block_modules = {m for m in shapes if m.startswith(("transformer_blocks.", "single_transformer_blocks."))}
    assert set(weights.layers) == block_modules  # every Linear of every block, nothing else
    assert weights.rank == R

    # Fused image qkv: one lora_down shared by q, k, v; lora_up cut in three equal parts.
    down, up, _ = pairs["double_blocks_1_img_attn_qkv"]
    for n, proj in enumerate(["to_q", "to_k", "to_v"]):
        layer = weights.layers[f"transformer_blocks.1.attn.{proj}"]
        assert torch.equal(layer.down, down)
        assert torch.equal(layer.up, up[32 * n : 32 * (n + 1)])
        assert layer.multiplier == 1.0
    down, up, _ = pairs["double_blocks_0_txt_attn_qkv"]
    assert torch.equal(weights.layers["transformer_blocks.0.attn.add_v_proj"].up, up[64:96])
    assert (
        weights.layers["transformer_blocks.0.attn.add_q_proj"].down
        is weights.layers["transformer_blocks.0.attn.add_k_proj"].down
    )  # shared, not copied

    # Single-block linear1: [inner, inner, inner, mlp_hidden] = [32, 32, 32, 128].
    down, up, _ = pairs["single_blocks_1_linear1"]
    assert up.shape == (224, R)
    parts = {
        p: weights.layers[f"single_transformer_blocks.1.{p}"]
        for p in ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
    }
    assert [tuple(layer.up.shape) for layer in parts.values()] == [(32, R)] * 3 + [(128, R)]
    assert torch.equal(parts["attn.to_v"].up, up[64:96])
    assert torch.equal(parts["proj_mlp"].up, up[96:])
    assert all(torch.equal(layer.down, down) for layer in parts.values())

    # Plain layers pass through untouched.
    down, up, _ = pairs["double_blocks_0_img_mod_lin"]
    assert torch.equal(weights.layers["transformer_blocks.0.norm1.linear"].up, up)
    assert torch.equal(weights.layers["single_transformer_blocks.0.proj_out"].down, pairs["single_blocks_0_linear2"][0])

    # nbytes counts a shared down once.
    expected = sum(d.nbytes + u.nbytes for d, u, _ in pairs.values())
    assert weights.nbytes == expected


def test_kohya_layers_outside_the_blocks(transformer, shapes):
    sd = {}
    for name, module, seed in [
        ("img_in", "x_embedder", 1),
        ("txt_in", "context_embedder", 2),
        ("time_in_in_layer", "time_text_embed.timestep_embedder.linear_1", 3),
        ("final_layer_adaLN_modulation_1", "norm_out.linear", 4),
    ]:
        n_in, n_out = shapes[module]
        sd[f"lora_unet_{name}.lora_down.weight"] = rand(R, n_in, seed=seed)
        sd[f"lora_unet_{name}.lora_up.weight"] = rand(n_out, R, seed=seed + 10)
    weights = load_lora(save(sd), transformer, 128)
    assert set(weights.layers) == {
        "x_embedder",
        "context_embedder",
        "time_text_embed.timestep_embedder.linear_1",
        "norm_out.linear",
    }
    assert torch.equal(weights.layers["x_embedder"].up, sd["lora_unet_img_in.lora_up.weight"])
    # BFL's final modulation is (shift, scale); diffusers' norm_out is (scale, shift).
    up = sd["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"]
    assert torch.equal(weights.layers["norm_out.linear"].up, torch.cat([up[32:], up[:32]]))


@pytest.mark.parametrize("prefix", ["transformer.", "", "base_model.model."])
@pytest.mark.parametrize(
    "suffixes",
    [
        ("lora_A.weight", "lora_B.weight"),
        ("lora.down.weight", "lora.up.weight"),
        ("lora_down.weight", "lora_up.weight"),
    ],
)
def test_diffusers_key_variants(transformer, shapes, prefix, suffixes):
    layers = bfl_layers(shapes, blocks=(1,), singles=(0,))
    pairs = random_pairs(layers, shapes, seed=7)
    sd = diffusers_file(pairs, layers, prefix=prefix, down_key=suffixes[0], up_key=suffixes[1])
    weights = load_lora(save(sd), transformer, 128)
    assert weights.format == "diffusers"
    assert set(weights.layers) == {t for targets in layers.values() for t in targets}
    layer = weights.layers["single_transformer_blocks.0.proj_mlp"]
    assert torch.equal(layer.down, sd[f"{prefix}single_transformer_blocks.0.proj_mlp.{suffixes[0]}"])
    assert torch.equal(layer.up, sd[f"{prefix}single_transformer_blocks.0.proj_mlp.{suffixes[1]}"])


@pytest.mark.parametrize("prefix", ["", "diffusion_model."])
def test_xlabs_maps_attention_layers(transformer, shapes, prefix):
    sd = {}
    expected = {}
    for i in (0, 1):
        for proc, targets in [
            ("qkv_lora1", ["attn.to_q", "attn.to_k", "attn.to_v"]),
            ("proj_lora1", ["attn.to_out.0"]),
            ("qkv_lora2", ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]),
            ("proj_lora2", ["attn.to_add_out"]),
        ]:
            up = rand(32 * len(targets), R, seed=i * 10 + len(sd))
            sd[f"{prefix}double_blocks.{i}.processor.{proc}.down.weight"] = rand(R, 32, seed=100 + len(sd))
            sd[f"{prefix}double_blocks.{i}.processor.{proc}.up.weight"] = up
            for n, t in enumerate(targets):
                expected[f"transformer_blocks.{i}.{t}"] = up[32 * n : 32 * (n + 1)]
    sd[f"{prefix}single_blocks.1.processor.qkv_lora.down.weight"] = rand(R, 32, seed=200)
    sd[f"{prefix}single_blocks.1.processor.qkv_lora.up.weight"] = up = rand(96, R, seed=201)
    for n, t in enumerate(["to_q", "to_k", "to_v"]):
        expected[f"single_transformer_blocks.1.attn.{t}"] = up[32 * n : 32 * (n + 1)]
    sd[f"{prefix}single_blocks.1.processor.proj_lora.down.weight"] = rand(R, 160, seed=202)
    sd[f"{prefix}single_blocks.1.processor.proj_lora.up.weight"] = expected["single_transformer_blocks.1.proj_out"] = (
        rand(32, R, seed=203)
    )

    weights = load_lora(save(sd), transformer, 128)
    assert weights.format == "xlabs"
    assert set(weights.layers) == set(expected)
    for module, up in expected.items():
        assert torch.equal(weights.layers[module].up, up), module
        assert weights.layers[module].multiplier == 1.0
    assert torch.equal(
        weights.layers["transformer_blocks.1.attn.add_k_proj"].down,
        sd[f"{prefix}double_blocks.1.processor.qkv_lora2.down.weight"],
    )


def test_three_formats_of_one_delta_agree(transformer, shapes):
    layers = bfl_layers(
        shapes,
        names={f"double_blocks_{i}_{s}" for i in (0, 1) for s in XLABS_DOUBLE}
        | {"single_blocks_0_linear2", "single_blocks_1_linear2"},
    )
    pairs = random_pairs(layers, shapes, seed=3)
    kohya = load_lora(save(kohya_file(pairs, alpha=8)), transformer, 128)
    diffusers = load_lora(save(diffusers_file(pairs, layers, alpha=8)), transformer, 128)
    xlabs_sd = {}
    for name, (down, up, _) in pairs.items():
        i = name.split("_")[2]
        key = (
            f"double_blocks.{i}.processor.{XLABS_DOUBLE[name.split('_', 3)[3]]}"
            if name.startswith("double")
            else f"single_blocks.{i}.processor.proj_lora"
        )
        xlabs_sd[f"{key}.down.weight"] = down.clone()
        xlabs_sd[f"{key}.up.weight"] = up * 2  # XLabs carries no alpha: the x2 of alpha 8 / rank 4 is baked in
    xlabs = load_lora(save(xlabs_sd), transformer, 128)
    assert (kohya.format, diffusers.format, xlabs.format) == ("kohya", "diffusers", "xlabs")
    assert len(kohya.layers) == 2 * 8 + 2
    assert_same_deltas(kohya, diffusers)
    assert_same_deltas(kohya, xlabs)


def test_alpha_gives_the_multiplier(transformer, shapes):
    layers = bfl_layers(shapes, names={"double_blocks_0_img_attn_qkv", "single_blocks_1_linear1"})
    pairs = random_pairs(layers, shapes)
    for sd, expected in [
        (kohya_file(pairs, alpha=8), 2.0),
        (kohya_file(pairs), 1.0),
        (kohya_file(pairs, alpha=2), 0.5),
        (diffusers_file(pairs, layers, alpha=8), 2.0),
        (diffusers_file(pairs, layers), 1.0),
    ]:
        weights = load_lora(save(sd), transformer, 128)
        assert {layer.multiplier for layer in weights.layers.values()} == {expected}
    sd = {
        "double_blocks.0.processor.proj_lora1.down.weight": rand(R, 32, seed=1),
        "double_blocks.0.processor.proj_lora1.up.weight": rand(32, R, seed=2),
        "double_blocks.0.processor.proj_lora1.alpha": torch.tensor(8.0),
    }
    assert load_lora(save(sd), transformer, 128).layers["transformer_blocks.0.attn.to_out.0"].multiplier == 2.0


def test_read_safetensors_converts_to_float32(tmp_path):
    sd = {"a": torch.ones(2, 3, dtype=torch.bfloat16), "b": torch.ones(1, dtype=torch.float16)}
    for source in (save(sd), tmp_path / "x.safetensors"):
        save_file(sd, tmp_path / "x.safetensors")
        assert {k: v.dtype for k, v in read_safetensors(source).items()} == {"a": torch.float32, "b": torch.float32}


# ----------------------------------------------------------------------------------------------- refusals

unpickled = []


class Boom:
    """Records it if anything ever unpickles it."""

    def __reduce__(self):
        return (unpickled.append, ("unpickled!",))


@pytest.fixture
def no_unpickling(monkeypatch):
    def forbidden(*args, **kwargs):
        pytest.fail("a LoRA file was unpickled")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    unpickled.clear()
    yield
    assert not unpickled


def _torch_saved(**kwargs) -> bytes:
    buffer = io.BytesIO()
    torch.save(
        {"lora_unet_double_blocks_0_img_mlp_0.lora_down.weight": torch.zeros(R, 32), "boom": Boom()}, buffer, **kwargs
    )
    return buffer.getvalue()


def _zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("lora.safetensors", save({"a": torch.zeros(1)}))
    return buffer.getvalue()


def _absurd_header() -> bytes:
    header = b'{"a":{"dtype":"F32","shape":[1000000000],"data_offsets":[0,4000000000]}}'
    return struct.pack("<Q", len(header)) + header


NOT_SAFETENSORS = {
    "torch.save (zip)": lambda: _torch_saved(),
    "torch.save (legacy pickle)": lambda: _torch_saved(_use_new_zipfile_serialization=False),
    "plain pickle": lambda: pickle.dumps({"boom": Boom()}),
    "random bytes": lambda: (
        torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes()
    ),
    "empty": lambda: b"",
    "zip": _zip,
    "header length over the file": lambda: struct.pack("<Q", 2**62) + b"{}",
    "header claiming 4 GB of data": _absurd_header,
}


@pytest.mark.parametrize("what", list(NOT_SAFETENSORS))
def test_not_safetensors_is_refused_without_unpickling(what, transformer, tmp_path, no_unpickling):
    data = NOT_SAFETENSORS[what]()  # built before the patch matters: torch.save pickles, fine
    path = tmp_path / "lora.safetensors"  # the name says safetensors; the content decides
    path.write_bytes(data)
    for source in (data, path):
        with pytest.raises(LoraError, match="not a safetensors file"):
            load_lora(source, transformer, 128)


def test_missing_file(transformer, tmp_path):
    with pytest.raises(LoraError, match="does not exist"):
        load_lora(tmp_path / "nope.safetensors", transformer, 128)


def _kohya_one(name="double_blocks_0_img_attn_proj", down=(R, 32), up=(32, R)) -> dict[str, torch.Tensor]:
    return {
        f"lora_unet_{name}.lora_down.weight": rand(*down, seed=1),
        f"lora_unet_{name}.lora_up.weight": rand(*up, seed=2),
    }


def _diffusers_one(module="transformer_blocks.0.attn.to_q", down=(R, 32), up=(32, R)) -> dict[str, torch.Tensor]:
    return {
        f"transformer.{module}.lora_A.weight": rand(*down, seed=1),
        f"transformer.{module}.lora_B.weight": rand(*up, seed=2),
    }


def test_unknown_keys(transformer):
    message = refused({**_diffusers_one(), "foo.bar": torch.zeros(1)}, transformer)
    assert "unknown key 'foo.bar'" in message and "not a FLUX transformer LoRA?" in message
    message = refused(
        {**_kohya_one(), **{f"lora_unet_mystery_{i}.lora_down.weight": torch.zeros(R, 32) for i in range(5)}},
        transformer,
    )
    assert message.count("lora_unet_mystery_") == 3 and "and 2 more" in message
    # A kohya file with a diffusers key mixed in is not silently half-read.
    assert "unknown key" in refused({**_kohya_one(), **_diffusers_one()}, transformer)
    # A module the model does not have, in diffusers naming.
    assert "does not have" in refused(_diffusers_one("transformer_blocks.0.attn.nope"), transformer)


@pytest.mark.parametrize(
    "key",
    [
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight",
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A.weight",
        "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight",
    ],
)
def test_text_encoder_keys(transformer, key):
    assert "text-encoder LoRA weights are not supported" in refused(
        {**_kohya_one(), key: torch.zeros(R, 32)}, transformer
    )


def test_wrong_shapes_and_ranks(transformer):
    assert refused(_diffusers_one(down=(R, 48)), transformer) == (
        "lora_down of transformer_blocks.0.attn.to_q has shape (4, 48) but that layer takes 32 inputs"
    )
    assert refused(_diffusers_one(up=(40, R)), transformer) == (
        "lora_up of transformer_blocks.0.attn.to_q has shape (40, 4) but that layer gives 32 outputs"
    )
    assert "lora_down has rank 4 but lora_up of shape (32, 8) has rank 8" in refused(
        _diffusers_one(up=(32, 8)), transformer
    )
    assert "rank 256 is over this server's limit of 128" in refused(
        _diffusers_one(down=(256, 32), up=(32, 256)), transformer
    )
    assert "rank 8 is over this server's limit of 4" in refused(_kohya_one(down=(8, 32), up=(32, 8)), transformer, 4)
    assert "2-D" in refused(_kohya_one(down=(R, 32, 1, 1)), transformer)
    # A fused qkv whose lora_up does not cut into this model's q, k, v.
    message = refused(_kohya_one("double_blocks_0_img_attn_qkv", up=(90, R)), transformer)
    assert "90 rows" in message and "32 + 32 + 32" in message
    message = refused(_kohya_one("single_blocks_0_linear1", up=(96, R)), transformer)
    assert "32 + 32 + 32 + 128" in message
    # One module given twice under two spellings.
    sd = {**_diffusers_one(), "transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(R, 32)}
    assert "appears twice" in refused(sd, transformer)
    # A down without its up.
    sd = _kohya_one()
    del sd["lora_unet_double_blocks_0_img_attn_proj.lora_up.weight"]
    assert "has no lora_up" in refused(sd, transformer)


def test_non_finite_values(transformer):
    sd = _diffusers_one()
    sd["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"][1, 2] = float("nan")
    assert "lora_down of 'transformer_blocks.0.attn.to_q' holds NaN or infinite values" in refused(sd, transformer)
    sd = _kohya_one()
    sd["lora_unet_double_blocks_0_img_attn_proj.lora_up.weight"][0, 0] = float("inf")
    assert "holds NaN or infinite values" in refused(sd, transformer)
    sd = {**_kohya_one(), "lora_unet_double_blocks_0_img_attn_proj.alpha": torch.tensor(float("nan"))}
    assert "alpha of" in refused(sd, transformer)


def test_block_the_model_does_not_have(transformer):
    message = refused(_kohya_one("double_blocks_7_img_attn_qkv", up=(96, R)), transformer)
    assert "lora_unet_double_blocks_7_img_attn_qkv" in message and "transformer_blocks.7.attn.to_q" in message
    assert "does not have" in message
    assert "does not have" in refused(_kohya_one("single_blocks_2_linear1", up=(224, R)), transformer)
    assert "does not have" in refused(
        {
            "double_blocks.5.processor.proj_lora1.down.weight": torch.zeros(R, 32),
            "double_blocks.5.processor.proj_lora1.up.weight": torch.zeros(32, R),
        },
        transformer,
    )


def test_empty_lora(transformer, shapes, tmp_path):
    assert "no LoRA weights" in refused({}, transformer)
    save_file({}, tmp_path / "empty.safetensors", metadata={"ss_network_dim": "4"})
    with pytest.raises(LoraError, match="no LoRA weights"):
        load_lora(tmp_path / "empty.safetensors", transformer, 128)


# ----------------------------------------------------------------------------------------------- full size


def test_full_size_flux_dev_kohya_without_the_model(transformer):
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):  # the architecture only: no weights are allocated
        model = FluxTransformer2DModel(**FLUX_DEV_CONFIG)
    shapes = linear_shapes(model)
    assert shapes["transformer_blocks.18.attn.to_q"] == (3072, 3072)
    assert shapes["single_transformer_blocks.37.proj_mlp"] == (3072, 12288)
    assert shapes["single_transformer_blocks.37.proj_out"] == (15360, 3072)

    sd = {
        **_kohya_one("double_blocks_0_img_attn_qkv", down=(R, 3072), up=(9216, R)),
        **_kohya_one("single_blocks_37_linear1", down=(R, 3072), up=(21504, R)),
        **_kohya_one("double_blocks_18_txt_mod_lin", down=(R, 3072), up=(18432, R)),
        **_kohya_one("single_blocks_20_linear2", down=(R, 15360), up=(3072, R)),
        "lora_unet_single_blocks_37_linear1.alpha": torch.tensor(16.0),
    }
    tensors = read_safetensors(save(sd))
    for config in (FLUX_DEV_CONFIG, model.config):
        weights = parse_lora(tensors, shapes, config, max_rank=128)
        assert weights.format == "kohya"
        assert {m: tuple(layer.up.shape) for m, layer in weights.layers.items()} == {
            "transformer_blocks.0.attn.to_q": (3072, R),
            "transformer_blocks.0.attn.to_k": (3072, R),
            "transformer_blocks.0.attn.to_v": (3072, R),
            "transformer_blocks.18.norm1_context.linear": (18432, R),
            "single_transformer_blocks.37.attn.to_q": (3072, R),
            "single_transformer_blocks.37.attn.to_k": (3072, R),
            "single_transformer_blocks.37.attn.to_v": (3072, R),
            "single_transformer_blocks.37.proj_mlp": (12288, R),
            "single_transformer_blocks.20.proj_out": (3072, R),
        }
        up = tensors["lora_unet_single_blocks_37_linear1.lora_up.weight"]
        assert torch.equal(weights.layers["single_transformer_blocks.37.proj_mlp"].up, up[9216:])
        assert torch.equal(weights.layers["single_transformer_blocks.37.attn.to_k"].up, up[3072:6144])
        assert weights.layers["single_transformer_blocks.37.proj_mlp"].multiplier == 4.0
    # The same file is refused by the tiny model, with a reason.
    qkv = {k: v for k, v in sd.items() if "double_blocks_0_img_attn_qkv" in k}
    assert refused(qkv, transformer) == (
        "lora_down of transformer_blocks.0.attn.to_q has shape (4, 3072) but that layer takes 32 inputs"
    )
    # With blocks the tiny model lacks, that is what the message says, whatever the key order.
    assert refused(sd, transformer) == (
        "'lora_unet_double_blocks_18_txt_mod_lin' targets module "
        "'transformer_blocks.18.norm1_context.linear', which this model "
        "does not have (a LoRA for a different model?)"
    )


def test_module_uses_safetensors_only():
    source = open(lora_formats.__file__).read()
    assert not re.search(r"(?<!safetensors\.)torch\.load\(", source)
    assert "import pickle" not in source


def test_kohya_mapping_matches_diffusers_own_converter():
    """Cross-check at FLUX.1-dev sizes (the only sizes diffusers' converter knows): every block layer
    of one double and one single block, plus the layers outside the blocks, give the same deltas."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    with torch.device("meta"):
        shapes = linear_shapes(FluxTransformer2DModel(**FLUX_DEV_CONFIG))
    layers = bfl_layers(shapes, blocks=(18,), singles=(37,))
    sd = kohya_file(random_pairs(layers, shapes), alpha=8)
    for name, module in [
        ("img_in", "x_embedder"),
        ("txt_in", "context_embedder"),
        ("time_in_out_layer", "time_text_embed.timestep_embedder.linear_2"),
        ("vector_in_in_layer", "time_text_embed.text_embedder.linear_1"),
        ("guidance_in_in_layer", "time_text_embed.guidance_embedder.linear_1"),
        ("final_layer_linear", "proj_out"),
        ("final_layer_adaLN_modulation_1", "norm_out.linear"),
    ]:
        sd.update(_kohya_one(name, down=(R, shapes[module][0]), up=(shapes[module][1], R)))
    ours = parse_lora(sd, shapes, FLUX_DEV_CONFIG, max_rank=128)
    theirs = _convert_kohya_flux_lora_to_diffusers({k: v.clone() for k, v in sd.items()})
    theirs = {k.removeprefix("transformer."): v for k, v in theirs.items()}
    assert {k.rsplit(".", 2)[0] for k in theirs} == set(ours.layers)
    for module, layer in ours.layers.items():
        probe = rand(shapes[module][0], 2, seed=5)  # compare delta @ probe: the full deltas are large
        expected = theirs[f"{module}.lora_B.weight"] @ (theirs[f"{module}.lora_A.weight"] @ probe)
        torch.testing.assert_close(layer.multiplier * layer.up @ (layer.down @ probe), expected, msg=module)


@pytest.mark.parametrize("prefix", ["", "diffusion_model."])
def test_xlabs_mapping_matches_diffusers_own_converter(transformer, shapes, prefix):
    """Every XLabs processor key (image and text streams of double blocks, single blocks' q/k/v and
    output) goes where diffusers' ``_convert_xlabs_flux_lora_to_diffusers`` puts it, with the same
    deltas: the expected mapping is diffusers', not written here."""
    from diffusers.loaders.lora_conversion_utils import _convert_xlabs_flux_lora_to_diffusers

    inner = shapes["transformer_blocks.0.attn.to_q"][1]
    dims = {  # (in, out) of each processor LoRA, read from the model's own layers
        "qkv_lora1": (shapes["transformer_blocks.0.attn.to_q"][0], 3 * inner),
        "qkv_lora2": (shapes["transformer_blocks.0.attn.add_q_proj"][0], 3 * inner),
        "proj_lora1": shapes["transformer_blocks.0.attn.to_out.0"],
        "proj_lora2": shapes["transformer_blocks.0.attn.to_add_out"],
        "qkv_lora": (shapes["single_transformer_blocks.0.attn.to_q"][0], 3 * inner),
        "proj_lora": shapes["single_transformer_blocks.0.proj_out"],
    }
    sd = {}
    for block, processors in [
        ("double", ["qkv_lora1", "qkv_lora2", "proj_lora1", "proj_lora2"]),
        ("single", ["qkv_lora", "proj_lora"]),
    ]:
        for index in (0, 1):
            for processor in processors:
                key = f"{prefix}{block}_blocks.{index}.processor.{processor}"
                sd[f"{key}.down.weight"] = rand(R, dims[processor][0], seed=len(sd))
                sd[f"{key}.up.weight"] = rand(dims[processor][1], R, seed=len(sd) + 1000)
    ours = parse_lora({k: v.clone() for k, v in sd.items()}, shapes, transformer.config, max_rank=128)
    theirs = _convert_xlabs_flux_lora_to_diffusers({k: v.clone() for k, v in sd.items()})
    theirs = {k.removeprefix("transformer."): v for k, v in theirs.items()}
    assert ours.format == "xlabs"
    assert {k.rsplit(".", 2)[0] for k in theirs} == set(ours.layers)
    assert len(ours.layers) == 2 * (3 + 3 + 1 + 1) + 2 * (3 + 1)
    for module, layer in ours.layers.items():
        expected = theirs[f"{module}.lora_B.weight"] @ theirs[f"{module}.lora_A.weight"]
        torch.testing.assert_close(layer.multiplier * layer.up @ layer.down, expected, msg=module)
