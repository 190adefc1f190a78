"""The OpenAPI document the server serves (``/openapi.json``; tests/test_openapi_fuzz.py proves it
serves this one) held to the contract written down in docs/fal-contract.md, independently of the
code: every field, its type, whether it is required, its default, its bounds and its values."""

from __future__ import annotations

import re

import pytest

from runners.front.fal_http import APP_ID, REQUESTS_PATH
from runners.front.openapi import openapi_document
from tests.conftest import REPO

CONTRACT = (REPO / "docs" / "fal-contract.md").read_text()
DOCUMENT = openapi_document(APP_ID, REQUESTS_PATH)
SCHEMAS = DOCUMENT["components"]["schemas"]
# The page's field tables, in its order, and the schema each one describes.
TABLE_SCHEMAS = [
    "InpaintRequest",
    "ImageSize",
    "LoraWeight",
    "InpaintOutput",
    "FalImage",
    "QueueSubmitted",
    "QueueStatus",
    "CancelResult",
    "ErrorBody",
]


def tables(header: str) -> list[list[dict[str, str]]]:
    """Every markdown table of the page whose header row starts with ``header``, as row dicts."""
    found, lines = [], CONTRACT.splitlines()
    for number, line in enumerate(lines):
        if not line.startswith(header):
            continue
        names = [cell.strip() for cell in line.strip("|").split("|")]
        rows = []
        for row in lines[number + 2 :]:
            if not row.startswith("|"):
                break
            cells = [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", row.strip()[1:-1])]
            rows.append(dict(zip(names, cells)))
        found.append(rows)
    return found


FIELD_TABLES = tables("| field |")


def parse_bounds(text: str) -> dict[str, float]:
    if not text:
        return {}
    if m := re.fullmatch(r"len (\d+)\.\.(\d+)", text):
        return {"minLength": int(m[1]), "maxLength": int(m[2])}
    if m := re.fullmatch(r"items <= (\d+)", text):
        return {"maxItems": int(m[1])}
    if m := re.fullmatch(r"(-?[\d.]+) (<=|<) x <= (-?[\d.]+)", text):
        low = "minimum" if m[2] == "<=" else "exclusiveMinimum"
        return {low: float(m[1]), "maximum": float(m[3])}
    raise AssertionError(f"docs/fal-contract.md: bounds {text!r} not understood")


def parse_default(text: str):
    if text == "":
        return "absent"
    return {"null": None, "true": True, "false": False, "[]": []}.get(text, _number_or_text(text))


def _number_or_text(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def branches(prop: dict) -> list[dict]:
    return prop.get("anyOf", [prop])


def schema_types(prop: dict) -> set[str]:
    return {"object" if "$ref" in branch else branch["type"] for branch in branches(prop)}


def schema_bounds(prop: dict) -> dict[str, float]:
    keys = ("minimum", "maximum", "exclusiveMinimum", "minLength", "maxLength", "maxItems", "minItems")
    return {key: float(branch[key]) for branch in branches(prop) for key in keys if key in branch}


def schema_values(prop: dict) -> list[str]:
    return [value for branch in branches(prop) for value in branch.get("enum", [])]


def test_the_page_has_one_field_table_per_schema():
    assert len(FIELD_TABLES) == len(TABLE_SCHEMAS)


@pytest.mark.parametrize("table, schema_name", list(zip(FIELD_TABLES, TABLE_SCHEMAS)), ids=TABLE_SCHEMAS)
def test_every_field_matches_the_written_contract(table, schema_name):
    schema = SCHEMAS[schema_name]
    properties = schema["properties"]
    assert [row["field"] for row in table] == list(properties), "fields (and their order) differ"
    assert {row["field"] for row in table if row["required"] == "yes"} == set(schema.get("required", []))
    for row in table:
        prop, name = properties[row["field"]], f"{schema_name}.{row['field']}"
        assert schema_types(prop) == {t.strip() for t in row["type"].split("|")}, name
        expected_default = parse_default(row["default"])
        actual_default = prop.get("default", "absent")
        if isinstance(expected_default, float):
            assert isinstance(actual_default, int | float) and float(actual_default) == expected_default, name
        else:
            assert actual_default == expected_default, name
        assert schema_bounds(prop) == {k: float(v) for k, v in parse_bounds(row["bounds"]).items()}, name
        assert schema_values(prop) == [v.strip() for v in row["values"].split(",") if v.strip()], name


def test_the_size_presets_are_the_written_ones():
    from runners.protocol.schema import IMAGE_SIZE_PRESETS

    (presets,) = tables("| preset |")
    assert {row["preset"]: (int(row["width"]), int(row["height"])) for row in presets} == IMAGE_SIZE_PRESETS


def test_every_written_route_is_in_the_document_with_its_answers():
    (routes,) = tables("| method |")
    for row in routes:
        operation = DOCUMENT["paths"][row["path"]][row["method"].lower()]
        assert {code.strip() for code in row["answers"].split(",")} <= set(operation["responses"]), row
    fal_paths = {row["path"] for row in routes}
    assert {path for path in DOCUMENT["paths"] if path != "/files/{name}"} == fal_paths
