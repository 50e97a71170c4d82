"""Write src/ftkit/config/sft_schema.json: every field of TRL's SFTConfig with its accepted YAML types,
choices, default and help text.

Why a snapshot: `ftkit validate` and `ftkit --help` must answer without importing torch (TRL
imports it, ~6 s). tests/test_recipe.py checks the snapshot against the installed TRL, so an
upgrade that adds or changes a field fails CI until this script is re-run.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import sys
import types
import typing
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "ftkit" / "config" / "sft_schema.json"


def yaml_kinds(tp) -> tuple[list[str], list[str] | None]:
    """Map a dataclass annotation to the YAML value kinds it accepts, and enum choices if any."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        kinds, choices = [], None
        for arg in typing.get_args(tp):
            k, c = yaml_kinds(arg)
            kinds += [x for x in k if x not in kinds]
            choices = c or choices
        return kinds, choices
    if origin is typing.Literal:
        vals = typing.get_args(tp)
        return sorted({"bool" if isinstance(v, bool) else type(v).__name__ for v in vals}), None
    if tp is type(None):
        return ["null"], None
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return ["str"], [m.value for m in tp]
    if tp in (bool, int, float, str):
        return [tp.__name__], None
    if origin in (list, tuple) or tp in (list, tuple):
        return ["list"], None
    if origin is dict or tp is dict:
        return ["dict"], None
    return ["object"], None


def jsonable(value):
    if isinstance(value, enum.Enum):
        return value.value
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


def field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return jsonable(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return jsonable(f.default_factory())  # type: ignore[misc]
    return None


def build_schema() -> dict:
    import trl
    from trl import SFTConfig

    hints = typing.get_type_hints(SFTConfig)
    fields = {}
    for f in dataclasses.fields(SFTConfig):
        if not f.init:
            continue
        kinds, choices = yaml_kinds(hints[f.name])
        meta_choices = f.metadata.get("choices")
        if meta_choices is not None:
            choices = [c for c in meta_choices]
        fields[f.name] = {
            "kinds": kinds,
            "choices": choices,
            "default": field_default(f),
            "help": f.metadata.get("help", ""),
        }
    return {"trl_version": trl.__version__, "fields": fields}


if __name__ == "__main__":
    schema = build_schema()
    if "--check" in sys.argv:
        current = json.loads(OUT.read_text(encoding="utf-8"))
        sys.exit(0 if current["fields"] == schema["fields"] else 1)
    OUT.write_text(json.dumps(schema, indent=1, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {OUT} ({len(schema['fields'])} fields, trl {schema['trl_version']})")
