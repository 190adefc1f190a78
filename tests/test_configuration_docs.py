"""docs/configuration.md is generated from the settings (docs/write_configuration.py): it must be
current, every setting must have a docstring, and the names and bounds it shows must be the ones
the code reads and enforces."""

from __future__ import annotations

import importlib.util
import re
import sys

import pytest

from runners.config import variable_names
from tests.conftest import REPO


def load_generator():
    spec = importlib.util.spec_from_file_location("write_configuration", REPO / "docs" / "write_configuration.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


generator = load_generator()
FIELDS = [
    pytest.param(group, name, field, id=f"{group.__name__}.{name}")
    for group in generator.groups()
    for name, field in group.model_fields.items()
]


def test_every_setting_has_a_docstring():
    assert generator.undocumented() == [], (
        "write a docstring under each of these fields (and the group class must derive from "
        "runners.config.SettingsGroup, which turns the docstrings into descriptions)"
    )


def test_the_configuration_page_is_current():
    assert (REPO / "docs" / "configuration.md").read_text() == generator.render(), (
        "docs/configuration.md is stale: run .venv/bin/python docs/write_configuration.py"
    )


def test_every_group_is_on_the_page_with_its_prefix():
    page = generator.render()
    for group in generator.groups():
        assert f"## `{group.__name__}` (`{group.model_config['env_prefix']}*`)" in page


@pytest.mark.parametrize("group, name, field", FIELDS)
def test_the_page_shows_each_variables_bounds_and_choices(group, name, field):
    """Each variable's row shows the bounds and choices the code enforces (that the code refuses a
    value just outside them, by the variable's name, is tests/test_config.py's)."""
    names = variable_names(group, name)
    row = next(line for line in generator.render().splitlines() if line.startswith(f"| `{names[0]}`"))
    shown = re.split(r"\s*(?:\.\.|;|≥|≤)\s*", row.split(" | ")[2])
    for item in field.metadata:
        for limit in (getattr(item, "ge", None), getattr(item, "le", None)):
            if limit is not None:
                assert generator.number(limit, name) in shown, (row, limit)
    if (choices := generator.choices(field.annotation)) is not None:
        assert all(f"`{choice}`" in row for choice in choices)


def test_bounds_and_defaults_read_as_written():
    """A few rows spelled out: the page says what an operator would type."""
    rows = {row.names[0]: row for group in generator.groups() for row in generator.rows(group)}
    assert rows["FLUX_BATCH_MAX_SIZE"].bounds == "2 .. 64" and rows["FLUX_BATCH_MAX_SIZE"].default == "`4`"
    assert rows["FLUX_MAX_BODY_BYTES"].bounds == "4 KiB .. 1 GiB"
    assert rows["FLUX_MAX_BODY_BYTES"].default == f"`{80 * 1024**2}` (80 MiB)"
    assert rows["FLUX_DEVICE"].bounds == "`auto`, `cpu`, `cuda`"
    assert rows["FLUX_FUSED_LORAS"].names == ["FLUX_FUSED_LORAS", "FLUX_LORA_FUSED"]
    assert rows["FLUX_EXPORT_BATCH_SIZES"].default == "`1,4`"
    assert "matches `^https?://" in rows["FLUX_PUBLIC_URL"].bounds
    # A default computed on the machine is described, not computed: the page is the same everywhere.
    assert rows["FLUX_CACHE_DIR"].default.startswith("`$XDG_CACHE_HOME/flux-inpaint`")
