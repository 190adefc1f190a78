"""Tests for runners/protocol/schema.py: every validation rule of ``InpaintRequest`` (docs/fal-contract.md),
the fal-shaped 422 body its errors become, and ``output_size``."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from runners.errors import InvalidField, validation_error_body
from runners.protocol.schema import IMAGE_SIZE_PRESETS, MAX_SEED, InpaintRequest, output_size

REQUIRED = {"prompt": "a red cat", "image_url": "data:image/png;base64,AAAA", "mask_url": "data:image/png;base64,BBBB"}
SECRET_PROMPT = "zebra-quokka-" + "7f3a9c" * 200 + "-private-prompt-text"


def make(**fields: Any) -> InpaintRequest:
    return InpaintRequest(**{**REQUIRED, **fields})


def refusal(fields: dict[str, Any] | None = None, *, drop: str | None = None, raw_json: str | None = None) -> dict:
    """The fal 422 body of a refused request (fails the test if the request is accepted)."""
    with pytest.raises(ValidationError) as caught:
        if raw_json is not None:
            InpaintRequest.model_validate_json(raw_json)
        else:
            values = {**REQUIRED, **(fields or {})}
            if drop is not None:
                values.pop(drop)
            InpaintRequest.model_validate(values)
    body = validation_error_body(caught.value.errors())
    assert body["error_type"] == "validation_error"
    assert body["detail"], "a refusal must say what is wrong"
    return body


def assert_names(body: dict, *path: str | int) -> None:
    """Every error of the body sits under ["body", *path] (the field named first)."""
    prefix = ["body", *[str(p) for p in path]]
    for error in body["detail"]:
        assert error["loc"][: len(prefix)] == prefix, body
        assert error["msg"] and error["type"]


# --- defaults --------------------------------------------------------------------------------------

DEFAULTS = [
    ("num_inference_steps", 28),
    ("guidance_scale", 3.5),
    ("strength", 0.85),
    ("num_images", 1),
    ("enable_safety_checker", True),
    ("output_format", "jpeg"),
    ("acceleration", "none"),
    ("sync_mode", False),
    ("loras", []),
    ("seed", None),
    ("image_size", None),
]


@pytest.mark.parametrize(("field", "default"), DEFAULTS)
def test_default_when_omitted(field, default):
    request = InpaintRequest.model_validate(REQUIRED)
    assert getattr(request, field) == default
    assert type(getattr(request, field)) is type(default)


def test_defaults_when_omitted_from_json():
    request = InpaintRequest.model_validate_json(json.dumps(REQUIRED))
    assert {field: getattr(request, field) for field, _ in DEFAULTS} == dict(DEFAULTS)
    assert request.requested_size() is None


def test_loras_default_is_not_shared():
    first = InpaintRequest.model_validate(REQUIRED)
    first.loras.append({"path": "x"})
    assert InpaintRequest.model_validate(REQUIRED).loras == []


# --- bounds ----------------------------------------------------------------------------------------

# (field, accepted at the edge, refused just past it)
BOUNDS = [
    ("num_inference_steps", 1, 0),
    ("num_inference_steps", 50, 51),
    ("guidance_scale", 0.0, -1e-9),
    ("guidance_scale", 35.0, 35.000001),
    ("strength", 0.01, 0.0099999),
    ("strength", 1.0, 1.0000001),
    ("num_images", 1, 0),
    ("num_images", 4, 5),
    ("seed", 0, -1),
    ("seed", MAX_SEED, MAX_SEED + 1),
]


@pytest.mark.parametrize(("field", "edge", "past"), BOUNDS, ids=[f"{b[0]}-{b[1]}" for b in BOUNDS])
def test_bounds(field, edge, past):
    assert getattr(make(**{field: edge}), field) == edge
    assert_names(refusal({field: past}), field)


@pytest.mark.parametrize("field", ["num_inference_steps", "guidance_scale", "strength", "num_images", "seed"])
def test_bounds_hold_through_json(field):
    past = {"num_inference_steps": 51, "guidance_scale": 36, "strength": 0, "num_images": 5, "seed": 2**64}[field]
    assert_names(refusal(raw_json=json.dumps({**REQUIRED, field: past})), field)


@pytest.mark.parametrize("side", ["width", "height"])
@pytest.mark.parametrize(("value", "ok"), [(1, True), (14142, True), (0, False), (-16, False), (14143, False)])
def test_custom_image_size_bounds(side, value, ok):
    size = {"width": 512, "height": 512, side: value}
    if ok:
        request = make(image_size=size)
        assert getattr(request.image_size, side) == value
        assert request.requested_size() == (size["width"], size["height"])
    else:
        assert_names(refusal({"image_size": size}), "image_size")


@pytest.mark.parametrize(("scale", "ok"), [(-4.0, True), (4.0, True), (0.0, True), (-4.01, False), (4.01, False)])
def test_lora_scale_bounds(scale, ok):
    lora = {"path": "owner/some-lora", "scale": scale}
    if ok:
        assert make(loras=[lora]).loras[0].scale == scale
    else:
        assert_names(refusal({"loras": [lora]}), "loras", 0, "scale")


def test_lora_scale_defaults_to_one():
    assert make(loras=[{"path": "style.safetensors"}]).loras[0].scale == 1.0


def test_at_most_sixteen_loras():
    loras = [{"path": f"lora-{i}", "scale": 0.5} for i in range(17)]
    assert len(make(loras=loras[:16]).loras) == 16
    assert_names(refusal({"loras": loras}), "loras")


@pytest.mark.parametrize("lora", [{"scale": 1.0}, {"path": ""}, {"path": 3}, "just-a-string", None])
def test_bad_lora_entry(lora):
    assert_names(refusal({"loras": [lora]}), "loras", 0)


# --- types -----------------------------------------------------------------------------------------

WRONG_TYPES = [
    ("num_inference_steps", "many"),
    ("num_inference_steps", 28.5),
    ("num_inference_steps", None),
    ("num_inference_steps", [28]),
    ("guidance_scale", "high"),
    ("guidance_scale", None),
    ("guidance_scale", {"value": 3.5}),
    ("strength", "strong"),
    ("strength", [0.5]),
    ("num_images", 2.5),
    ("num_images", "two"),
    ("seed", 1.5),
    ("seed", "random"),
    ("seed", [1]),
    ("enable_safety_checker", "maybe"),
    ("enable_safety_checker", 2),
    ("enable_safety_checker", None),
    ("sync_mode", "sometimes"),
    ("sync_mode", [True]),
    ("output_format", 1),
    ("output_format", None),
    ("acceleration", 0),
    ("loras", "a-lora"),
    ("loras", {"path": "a"}),
    ("image_size", 1024),
    ("image_size", [1024, 1024]),
    ("image_size", {"width": "wide", "height": 512}),
    ("image_size", {"width": 512.5, "height": 512}),
    ("prompt", 42),
    ("prompt", None),
    ("prompt", ["a", "cat"]),
    ("image_url", 7),
    ("image_url", None),
    ("mask_url", {"url": "x"}),
    ("mask_url", None),
]


@pytest.mark.parametrize(("field", "value"), WRONG_TYPES, ids=[f"{f}-{v!r}" for f, v in WRONG_TYPES])
def test_wrong_type_refused(field, value):
    assert_names(refusal({field: value}), field)


@pytest.mark.parametrize("field", ["guidance_scale", "strength"])
@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-Infinity", '"NaN"', '"inf"', "1e999"])
def test_non_finite_floats_refused(field, raw):
    text = json.dumps(REQUIRED)[:-1] + f', "{field}": {raw}}}'
    body = refusal(raw_json=text)
    assert_names(body, field)


@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_lora_scale_refused(raw):
    text = json.dumps(REQUIRED)[:-1] + f', "loras": [{{"path": "a", "scale": {raw}}}]}}'
    assert_names(refusal(raw_json=text), "loras", 0, "scale")


# --- prompt and required fields -----------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["", " ", "   \t\n  ", "\u3000\u2003"])
def test_blank_prompt_refused(prompt):
    assert_names(refusal({"prompt": prompt}), "prompt")


def test_prompt_kept_verbatim():
    assert make(prompt="  a cat  ").prompt == "  a cat  "


def test_overlong_prompt_refused():
    assert_names(refusal({"prompt": "x" * 20_001}), "prompt")


@pytest.mark.parametrize("field", ["prompt", "image_url", "mask_url"])
def test_required_field_missing(field):
    body = refusal(drop=field)
    assert_names(body, field)
    assert body["detail"][0]["type"] == "missing"


@pytest.mark.parametrize("field", ["image_url", "mask_url"])
def test_empty_url_refused(field):
    assert_names(refusal({field: ""}), field)


def test_all_missing_names_each_field():
    with pytest.raises(ValidationError) as caught:
        InpaintRequest.model_validate({})
    locs = {tuple(e["loc"]) for e in validation_error_body(caught.value.errors())["detail"]}
    assert locs == {("body", "prompt"), ("body", "image_url"), ("body", "mask_url")}


# --- enums and presets -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("output_format", "webp"),
        ("output_format", "JPEG"),
        ("output_format", "jpg"),
        ("output_format", ""),
        ("acceleration", "high"),
        ("acceleration", "Regular"),
        ("acceleration", ""),
        ("image_size", "huge"),
        ("image_size", "Square_HD"),
        ("image_size", "1024x1024"),
        ("image_size", ""),
    ],
)
def test_unknown_enum_value_refused(field, value):
    assert_names(refusal({field: value}), field)


@pytest.mark.parametrize(
    ("field", "value"),
    [("output_format", "png"), ("output_format", "jpeg"), ("acceleration", "regular"), ("acceleration", "none")],
)
def test_known_enum_value_accepted(field, value):
    assert getattr(make(**{field: value}), field) == value


FAL_PRESETS = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}


@pytest.mark.parametrize(("preset", "size"), FAL_PRESETS.items())
def test_preset_sizes(preset, size):
    assert make(image_size=preset).requested_size() == size


def test_exactly_the_six_presets():
    assert IMAGE_SIZE_PRESETS == FAL_PRESETS


def test_custom_size_needs_no_preset_name():
    request = InpaintRequest.model_validate_json(json.dumps({**REQUIRED, "image_size": {"width": 640, "height": 480}}))
    assert request.requested_size() == (640, 480)


def test_custom_size_refuses_unknown_keys():
    assert_names(refusal({"image_size": {"width": 64, "height": 64, "depth": 3}}), "image_size")


# --- extras ---------------------------------------------------------------------------------------


def test_unknown_top_level_fields_ignored():
    request = InpaintRequest.model_validate_json(
        json.dumps({**REQUIRED, "future_option": {"x": 1}, "num_steps": 99, "webhook": "https://x"})
    )
    dumped = request.model_dump()
    assert "future_option" not in dumped and "num_steps" not in dumped and "webhook" not in dumped
    assert request.num_inference_steps == 28


# --- the 422 body never echoes the request -------------------------------------------------------------

NON_ECHO = [
    {"num_inference_steps": 99},
    {"guidance_scale": "NaN"},
    {"output_format": "gif"},
    {"image_size": "huge"},
    {"image_size": {"width": 0, "height": 10}},
    {"loras": [{"path": "a", "scale": 9}]},
    {"seed": -5},
    {"image_url": None},
]


@pytest.mark.parametrize("bad", NON_ECHO, ids=[next(iter(b)) for b in NON_ECHO])
def test_error_body_does_not_echo_inputs(bad):
    mask = "data:image/png;base64," + "SECRETMASKPAYLOAD" * 50
    body = refusal({"prompt": SECRET_PROMPT, "mask_url": mask, **bad})
    text = json.dumps(body)
    assert "zebra-quokka" not in text and "7f3a9c" not in text
    assert "SECRETMASKPAYLOAD" not in text
    assert_names(body, next(iter(bad)))
    assert all(set(error) == {"loc", "msg", "type"} for error in body["detail"])


def test_error_body_does_not_echo_a_bad_prompt():
    body = refusal({"prompt": SECRET_PROMPT * 20})  # too long: the prompt itself is the bad field
    assert_names(body, "prompt")
    assert "zebra-quokka" not in json.dumps(body)


def test_error_body_does_not_echo_a_bad_url():
    body = refusal({"image_url": ["data:image/png;base64,SECRETIMAGEPAYLOAD"]})
    assert_names(body, "image_url")
    assert "SECRETIMAGEPAYLOAD" not in json.dumps(body)


# --- output_size ---------------------------------------------------------------------------------------

BIG = 14142 * 14142


@pytest.mark.parametrize(
    ("input_size", "expected"),
    [
        ((1000, 777), (992, 768)),
        ((1024, 768), (1024, 768)),
        ((16, 16), (16, 16)),
        ((31, 47), (16, 32)),
        ((17, 2049), (16, 2048)),
        ((8, 8), (16, 16)),
        ((1, 100), (16, 96)),
    ],
)
def test_output_size_from_input_rounds_down_to_16(input_size, expected):
    assert output_size(make(), input_size, BIG) == expected


@pytest.mark.parametrize(
    ("custom", "expected"),
    [
        ((17, 17), (16, 16)),
        ((8, 8), (16, 16)),
        ((1, 1), (16, 16)),
        ((33, 100), (32, 96)),
        ((14142, 14142), (14128, 14128)),
    ],
)
def test_output_size_custom_rounds_down_to_16(custom, expected):
    request = make(image_size={"width": custom[0], "height": custom[1]})
    assert output_size(request, (4000, 3000), BIG) == expected


@pytest.mark.parametrize(("preset", "size"), FAL_PRESETS.items())
def test_output_size_presets_unchanged(preset, size):
    assert output_size(make(image_size=preset), (333, 999), 1024 * 1024) == size


def test_output_size_at_budget_edge_accepted():
    assert output_size(make(image_size={"width": 512, "height": 512}), (64, 64), 512 * 512) == (512, 512)


def test_output_size_rounds_before_the_budget():
    assert output_size(make(), (1039, 1039), 1024 * 1024) == (1024, 1024)


def _over_budget(request: InpaintRequest, input_size, max_pixels) -> InvalidField:
    with pytest.raises(InvalidField) as caught:
        output_size(request, input_size, max_pixels)
    error = caught.value
    assert error.status == 422
    assert error.to_body()["error_type"] == "validation_error"
    assert str(max_pixels) in error.reason
    return error


def test_output_size_custom_over_budget_names_image_size():
    error = _over_budget(make(image_size={"width": 512, "height": 528}), (64, 64), 512 * 512)
    assert error.field == "image_size"
    assert error.detail()[0]["loc"] == ["body", "image_size"]


def test_output_size_preset_over_budget_names_image_size():
    assert _over_budget(make(image_size="square_hd"), (64, 64), 1024 * 1023).field == "image_size"


def test_output_size_input_over_budget_names_image_url():
    error = _over_budget(make(), (4000, 3000), 2048 * 2048)
    assert error.field == "image_url"
    assert error.detail()[0]["loc"] == ["body", "image_url"]
