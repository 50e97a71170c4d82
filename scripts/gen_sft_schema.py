"""Write src/ftkit/config/sft_schema.json (every field of TRL's SFTConfig with its accepted YAML types, choices,
default and help text) and src/ftkit/config/preference_schema.json (the same for the preference trainers' configs:
DPOConfig, KTOConfig, and the ORPO/CPO configs TRL 1.16 keeps in trl.experimental; CPOConfig serves SimPO too).

Why a snapshot: `ftkit validate` and `ftkit --help` must answer without importing torch (TRL
imports it, ~6 s). tests/test_recipe.py checks the snapshot against the installed TRL, so an
upgrade that adds or changes a field fails CI until this script is re-run.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import json
import re
import sys
import types
import typing
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "ftkit" / "config" / "sft_schema.json"
PREFERENCE_OUT = OUT.with_name("preference_schema.json")
# method -> (module, class) of its TRL config; simpo is CPO's loss_type simpo.
PREFERENCE_CONFIGS = {"dpo": ("trl", "DPOConfig"), "kto": ("trl", "KTOConfig"),
                      "orpo": ("trl.experimental.orpo", "ORPOConfig"), "cpo": ("trl.experimental.cpo", "CPOConfig")}
# DPOConfig types loss_type as a free list of strings and names the values in its help only.
LISTED_VALUES = re.compile(r"Possible values are:(.*?)\.\s*If multiple", re.S)


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

    return {"trl_version": trl.__version__, "fields": config_fields(SFTConfig)}


def list_choices(name: str, spec: dict) -> list[str] | None:
    """Values a list-typed field names in its help text (DPOConfig's loss_type), else None."""
    found = LISTED_VALUES.search(spec["help"]) if "list" in spec["kinds"] and name == "loss_type" else None
    return re.findall(r"'([a-z_0-9]+)'", found.group(1)) if found else None


def build_preference_schema(sft_fields: dict) -> dict:
    """Per method: the names of its config's fields, and the specs of those that differ from SFTConfig's (a field
    SFTConfig has with the same spec is stored as its name only, keeping the snapshot small)."""
    import trl

    methods = {}
    for method, (module, name) in PREFERENCE_CONFIGS.items():
        fields = config_fields(getattr(importlib.import_module(module), name))
        for key, spec in fields.items():
            spec["choices"] = spec["choices"] or list_choices(key, spec)
        methods[method] = {"config": name, "shared_with_sft": sorted(k for k, v in fields.items() if sft_fields.get(k) == v),
                           "fields": {k: v for k, v in fields.items() if sft_fields.get(k) != v}}
    return {"trl_version": trl.__version__, "methods": methods}


def config_fields(config_class) -> dict:
    hints = typing.get_type_hints(config_class)
    fields = {}
    for f in dataclasses.fields(config_class):
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
    return fields


if __name__ == "__main__":
    schema = build_schema()
    preference = build_preference_schema(schema["fields"])
    if "--check" in sys.argv:
        current = json.loads(OUT.read_text(encoding="utf-8"))
        current_preference = json.loads(PREFERENCE_OUT.read_text(encoding="utf-8"))
        sys.exit(0 if (current["fields"], current_preference["methods"]) == (schema["fields"], preference["methods"])
                 else 1)
    for path, data in ((OUT, schema), (PREFERENCE_OUT, preference)):
        path.write_text(json.dumps(data, indent=1, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {OUT} ({len(schema['fields'])} fields) and {PREFERENCE_OUT.name} "
          f"({', '.join(preference['methods'])}), trl {schema['trl_version']}")
