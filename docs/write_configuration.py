"""Writes docs/configuration.md from the settings themselves: every group of runners/config.py's
``Settings`` and the Triton server's own, each field's variable names, default, bounds and docstring.

    .venv/bin/python docs/write_configuration.py          # rewrite the page
    .venv/bin/python docs/write_configuration.py --check  # exit 1 when the page is stale

The names are the ones pydantic-settings reads (``runners.config.variable_names``, checked against its own ``EnvSettingsSource`` in tests/test_config.py; aliases
included), the bounds come from each field's constraints (``ge``/``le``, lengths, patterns, Literal
choices) and the text from the docstring under the field (``SettingsGroup``: ``use_attribute_docstrings``).
tests/test_configuration_docs.py fails when the page is stale or a setting has no docstring.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import annotated_types
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere: the repository's packages first
    sys.path.insert(0, str(REPO))

from runners.config import Settings, variable_names  # noqa: E402
from runners.worker.triton_server import TritonServerSettings  # noqa: E402

PAGE = REPO / "docs" / "configuration.md"
UNITS = [(1024**4, "TiB"), (1024**3, "GiB"), (1024**2, "MiB"), (1024, "KiB")]

INTRO = """\
# Configuration

Every setting of the server, as environment variables, one table per group. They are read and
checked when a process starts: a value out of its bounds or not among its choices stops the process
before anything is served, with pydantic's error naming the group and the field (`BatchingSettings`,
`max_size` is `FLUX_BATCH_MAX_SIZE`: the headings below give each group's prefix). A variable not on
this page is ignored, so a misspelt name takes no effect. Names are case-insensitive; lists are
comma-separated (`a,b,c`); booleans are `true` or `false` (`1`, `0`); sizes in bytes are plain
integers. Every process of a deployment (the front, the model worker, the Triton server, `python -m
export`) reads the same variables.

The settings live in [runners/config.py](../runners/config.py), one pydantic-settings class per
concern, and the Triton server's own in
[runners/worker/triton_server.py](../runners/worker/triton_server.py). This page is generated from
them by `.venv/bin/python docs/write_configuration.py`: do not edit it by hand; change a field's
docstring (the string under it) or its bounds and run the script again.
`tests/test_configuration_docs.py` fails when this page is stale or a setting has no docstring.

Where each setting matters: [docs/api.md](api.md) (limits, deadlines, shutdown),
[docs/loras.md](loras.md), [docs/export.md](export.md) (backends), [docs/triton.md](triton.md),
[docs/deploying.md](deploying.md), [docs/security.md](security.md).
"""


def groups() -> list[type[BaseSettings]]:
    """Every group, in ``Settings``' order, then the Triton server's."""
    return [field.annotation for field in Settings.model_fields.values()] + [TritonServerSettings]


def is_bytes(name: str) -> bool:
    return name.endswith("_bytes")


def human_bytes(value: int) -> str:
    for size, unit in UNITS:
        if value >= size and value % size == 0:
            return f"{value // size} {unit}"
    return f"{value} B"


def show(value, name: str) -> str:
    """A value as it would be written in the environment."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, (list, tuple)):
        return f"`{','.join(str(v) for v in value)}`" if value else "empty"
    if isinstance(value, float):
        return f"`{value:g}`"
    if isinstance(value, int) and is_bytes(name) and value >= 1024:
        return f"`{value}` ({human_bytes(value)})"
    return f"`{value}`"


def default(field: FieldInfo, name: str) -> str:
    factory = field.default_factory
    if factory is not None:
        # A default computed from the machine (a home directory) says what it is in its docstring,
        # so the page is the same on every machine; a plain factory (a list) is simply called.
        if isinstance(factory, types.FunctionType) and factory.__name__ != "<lambda>" and factory.__doc__:
            return rst_to_markdown(factory.__doc__)
        return show(factory(), name)
    if field.default is PydanticUndefined:
        return "required"
    return show(field.default, name)


def choices(annotation) -> list | None:
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    for member in typing.get_args(annotation) if isinstance(annotation, types.UnionType) else ():
        if (found := choices(member)) is not None:
            return found
    return None


def is_list(annotation) -> bool:
    members = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    return any(typing.get_origin(member) in (list, tuple, set) for member in members)


def number(value, name: str) -> str:
    if is_bytes(name) and isinstance(value, int) and value >= 1024:
        return human_bytes(value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def bounds(field: FieldInfo, name: str) -> str:
    """The field's constraints, from its metadata (what pydantic enforces), in a few words."""
    found = choices(field.annotation)
    if found is not None:
        return ", ".join(f"`{choice}`" for choice in found)
    low = high = low_strict = high_strict = None
    min_len = max_len = pattern = None
    for item in field.metadata:
        if isinstance(item, annotated_types.Ge):
            low = item.ge
        elif isinstance(item, annotated_types.Gt):
            low_strict = item.gt
        elif isinstance(item, annotated_types.Le):
            high = item.le
        elif isinstance(item, annotated_types.Lt):
            high_strict = item.lt
        elif isinstance(item, annotated_types.MinLen):
            min_len = item.min_length
        elif isinstance(item, annotated_types.MaxLen):
            max_len = item.max_length
        elif getattr(item, "pattern", None):
            pattern = item.pattern
    parts = []
    if low is not None and high is not None:
        parts.append(f"{number(low, name)} .. {number(high, name)}")
    else:
        for value, sign in ((low, "≥"), (low_strict, ">"), (high, "≤"), (high_strict, "<")):
            if value is not None:
                parts.append(f"{sign} {number(value, name)}")
    what = "items" if is_list(field.annotation) else "characters"
    if min_len is not None and max_len is not None:
        parts.append(f"{min_len} .. {max_len} {what}")
    elif max_len is not None:
        parts.append(f"at most {max_len} {what}")
    elif min_len is not None:
        parts.append(f"at least {min_len} {what}")
    if pattern:
        parts.append(f"matches `{pattern}`")
    return "; ".join(parts)


def rst_to_markdown(text: str) -> str:
    """A docstring as one table cell: one line, ``literal`` as `literal`."""
    return " ".join(text.split()).replace("``", "`")


def cell(text: str) -> str:
    return text.replace("|", "\\|")


@dataclass(frozen=True)
class Row:
    names: list[str]
    default: str
    bounds: str
    doc: str

    def markdown(self) -> str:
        first, *others = self.names
        variable = f"`{first}`" + (f" (also `{'`, `'.join(others)}`)" if others else "")
        return f"| {variable} | {cell(self.default)} | {cell(self.bounds)} | {cell(self.doc)} |"


def rows(group: type[BaseSettings]) -> list[Row]:
    return [
        Row(
            names=variable_names(group, name),
            default=default(field, name),
            bounds=bounds(field, name),
            doc=rst_to_markdown(field.description or ""),
        )
        for name, field in group.model_fields.items()
    ]


def undocumented() -> list[str]:
    """Every group without a class docstring and every setting without a field docstring."""
    missing = []
    for group in groups():
        if not (group.__doc__ or "").strip():
            missing.append(f"{group.__module__}.{group.__name__} (the class)")
        for name, field in group.model_fields.items():
            if not (field.description or "").strip():
                missing.append(f"{group.__module__}.{group.__name__}.{name} ({', '.join(variable_names(group, name))})")
    return missing


def render() -> str:
    parts = [INTRO]
    for group in groups():
        prefix = group.model_config.get("env_prefix", "")
        parts.append(f"## `{group.__name__}` (`{prefix}*`)\n")
        parts.append(rst_to_markdown(group.__doc__ or "") + "\n")
        parts.append("| variable | default | bounds | what it does |\n|---|---|---|---|")
        parts.append("\n".join(row.markdown() for row in rows(group)) + "\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/configuration.md is stale")
    args = parser.parse_args(argv)
    missing = undocumented()
    if missing:
        print("settings without a docstring:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 1
    page = render()
    current = PAGE.read_text() if PAGE.exists() else ""
    if args.check:
        if current != page:
            diff = difflib.unified_diff(current.splitlines(), page.splitlines(), "on disk", "generated", lineterm="")
            print("\n".join(diff), file=sys.stderr)
            print(f"{PAGE} is stale: run .venv/bin/python docs/write_configuration.py", file=sys.stderr)
            return 1
        return 0
    if current != page:
        PAGE.write_text(page)
        print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
