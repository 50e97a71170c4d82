"""Recipe stage: read a flat YAML recipe, check every key and value, split it among its owners.

TRL's own YAML parsing skips type and choice checks and forwards unknown keys to accelerate; ftkit
checks everything itself and reports every problem of a recipe at once, each naming file, line and key.
Nothing here imports torch: `ftkit validate` must answer in well under a second.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any

import yaml

from ftkit.config import checks as recipe_checks
from ftkit.config.arguments import DataArguments, ModelArguments, RunArguments
from ftkit.config.schema import (IGNORED, INT64, METHOD_ALIASES, METHOD_CONFIGS, PREFERENCE_DATA_KEYS,
                                 RENAMED, RENAMED_VALUES, SECTIONS, Recipe, key_table, methods_with_key)
from ftkit.errors import FtkitError
from ftkit.files import read_text

def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "dict"}.get(type(value), "object")


def coerce(value: Any, kinds: list[str]) -> Any:
    """YAML reads `1e-4` as a string, `3` as an int and `no` as false; accept what the field obviously means."""
    kind = _type_name(value)
    if kind == "str" and "str" not in kinds and ("float" in kinds or "int" in kinds):
        try:
            number = float(value)
        except ValueError:
            return value
        return int(number) if "int" in kinds and "float" not in kinds and number.is_integer() else number
    if kind == "int" and "int" not in kinds and "float" in kinds:
        return float(value) if abs(value) < INT64 else value  # a huge int is reported, not an OverflowError
    if kind == "bool" and "bool" not in kinds and "str" in kinds:
        return "yes" if value else "no"  # YAML 1.1 reads `save_strategy: no` as false; the user meant "no"
    if kind == "str" and "list" in kinds and "str" not in kinds:
        return [value]
    return value


def check_value(key: str, value: Any, kinds: list[str], choices: list | None) -> str | None:
    """Return a problem with one value, or None."""
    kind = _type_name(value)
    if kind not in kinds and "object" not in kinds:
        expected = " or ".join(k for k in kinds if k != "null")
        return f"expected {expected}, got {kind} {value!r}"
    if kind == "float" and not math.isfinite(value):  # YAML's .nan/.inf: no key means either
        return f"must be a finite number, got {value}"
    if kind == "int" and not -INT64 <= value < INT64:  # torch, numpy and Arrow overflow past int64
        return f"{value} is out of range (the largest accepted number is {INT64 - 1})"
    for item in (value if kind == "list" else [value]) if choices else []:  # a list's items (DPO's loss_type)
        if isinstance(item, str) and item not in choices:
            close = difflib.get_close_matches(item, [str(c) for c in choices], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            listed = ", ".join(str(c) for c in choices[:15]) + (", ..." if len(choices) > 15 else "")
            return f"'{item}' is not one of: {listed}{hint}"
    return None


def yaml_problem(path: Path, text: str, err: yaml.YAMLError) -> str:
    """PyYAML's error as one line with the file and line it is on."""
    if isinstance(err, yaml.reader.ReaderError):  # a control character: no mark, a position
        line = text.count("\n", 0, err.position) + 1
        code = err.character if isinstance(err.character, int) else ord(err.character)
        return (f"{path}:{line}: not valid YAML: control character 0x{code:02x} is not allowed (remove it, or write "
                "it as an escape inside double quotes)")
    mark = getattr(err, "problem_mark", None)
    where = f"{path}:{mark.line + 1}" if mark else str(path)
    problem = " ".join(str(getattr(err, "problem", None) or err).split())  # PyYAML's messages span lines
    return f"{where}: not valid YAML: {problem}"


def read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """Load a recipe with yaml.safe_load semantics, plus the line of every top-level key."""
    text = read_text(path, "recipe file")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise FtkitError(yaml_problem(path, text, err)) from None
    if data is None:
        raise FtkitError(f"{path}: the recipe is empty; it needs at least model_name_or_path and a dataset")
    if not isinstance(data, dict):
        raise FtkitError(f"{path}: a recipe is a mapping of keys to values, got {_type_name(data)}")
    lines: dict[str, int] = {}
    for key, _ in node.value if isinstance(node, yaml.MappingNode) else []:
        line = key.start_mark.line + 1
        if key.value in lines:  # safe_load silently keeps the last one
            raise FtkitError(f"{path}:{line}: key '{key.value}' is given twice (first on line {lines[key.value]}); "
                             "keep one")
        lines[key.value] = line
    return data, lines


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`--set key=value` pairs; values are read as YAML, so 2e-4, true and [a, b] mean what they say."""
    values = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise FtkitError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set learning_rate=2e-4")
        try:
            values[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            values[key.strip()] = raw
    return values


def rename_legacy(key: str, value: Any, notes: list[str], where: str) -> tuple[str, Any] | None:
    """Map an old key to its current name (or None to drop it), adding a one-line note."""
    if key in IGNORED:
        notes.append(f"{where}: '{key}' is no longer used ({IGNORED[key]}); ignored")
        return None
    new = RENAMED[key]
    if key == "use_flash_attention_2":
        notes.append(f"{where}: 'use_flash_attention_2' is deprecated; use attn_implementation: flash_attention_2")
        return (new, "flash_attention_2") if value else None
    notes.append(f"{where}: '{key}' is deprecated; renamed to '{new}'")
    return new, value


def rename_value(key: str, value: Any, notes: list[str], where: str, choices: list | None = None) -> Any:
    """Map an older TRL name of a value to the current one, adding a one-line note; only where the current name is
    a value this method's key takes (SFT's loss_type chunked_nll is no DPO loss)."""
    new = RENAMED_VALUES.get(key, {}).get(value) if isinstance(value, str) else None
    if new is None or (choices is not None and new not in choices):
        return value
    notes.append(f"{where}: {key} '{value}' is older TRL's name; renamed to '{new}'")
    return new


def load_recipe(path: str | Path | None, overrides: list[str] | dict | None = None, raw: dict | None = None) -> Recipe:
    """Read, check and split a recipe. Raises FtkitError listing every problem found."""

    path = Path(path) if path is not None else None
    data, lines = (raw, {}) if raw is not None else read_yaml(path)  # type: ignore[arg-type]
    label = str(path) if path else "recipe"
    extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides or [])
    items = [(k, v, f"{label}:{lines[k]}" if k in lines else label) for k, v in data.items()]
    items += [(k, v, f"--set {k}") for k, v in extra.items()]

    problems, notes, rejected = [], [], set()  # rejected: keys whose value was refused (left at their default)
    items, method = resolve_method(items, notes, problems)
    table = key_table(method)
    sections: dict[str, dict[str, Any]] = {name: {} for name in (*SECTIONS, "sft")}
    for key, value, where in items:
        if not isinstance(key, str):
            problems.append(f"{where}: key {key!r} is not a name")
            continue
        if key in RENAMED or key in IGNORED:
            renamed = rename_legacy(key, value, notes, where)
            if renamed is None:
                continue
            key, value = renamed
        if key not in table:
            problems.append(f"{where}: {foreign_key(key, method) or 'unknown key ' + repr(key) + suggest(key, table)}")
            continue
        if key in PREFERENCE_DATA_KEYS and method == "sft" and value is not None:
            problems.append(f"{where}: '{key}' applies to preference training only; set method: dpo (or kto, orpo, "
                            "simpo), or remove it")
            continue
        section, kinds, choices = table[key]
        value = coerce(rename_value(key, value, notes, where, choices), kinds)
        problem = check_value(key, value, kinds, choices)
        if problem:
            problems.append(f"{where}: '{key}': {problem}")
            rejected.add(key)
            continue
        sections[section][key] = value

    sections["run"].setdefault("method", method)  # inferred, or the default
    recipe = Recipe(
        model=ModelArguments(**sections["model"]),
        data=DataArguments(**sections["data"]),
        run=RunArguments(**sections["run"]),
        sft=sections["sft"],
        path=path,
        notes=notes,
    )
    where_of = {k: w for k, _, w in items}
    problems += [f"{where_of.get(k, label)}: '{k}': {msg}" for k, msg in recipe_checks.check(recipe)
                 if k not in rejected]  # a refused value's default would only add a second line about it
    if problems:
        raise FtkitError(*problems)
    return recipe


def resolve_method(items: list, notes: list[str], problems: list[str]) -> tuple[list, str]:
    """The recipe's method: `method` (or a peer's alias for it), else dpo when a key only preference trainers have is
    present, else sft. -> (items with any alias renamed to `method`, method)."""
    given = []
    for i, (key, value, where) in enumerate(items):
        if key in METHOD_ALIASES:
            notes.append(f"{where}: '{key}' ({METHOD_ALIASES[key]}'s name) read as 'method'")
            items[i] = ("method", value, where)
        if items[i][0] == "method":
            given.append(items[i])
    if len(given) > 1:
        problems.append(f"{given[1][2]}: the method is given twice (also at {given[0][2]}); keep one")
    if given:
        value = given[-1][1]
        if value == "ipo":
            problems.append(f"{given[-1][2]}: 'method': IPO is DPO with another loss: set method: dpo and "
                            "loss_type: ipo")
        known = isinstance(value, str) and value in METHOD_CONFIGS
        return items, value if known else "sft"  # a bad value is reported by the key check
    sft_table, dpo_table = key_table("sft"), key_table("dpo")
    for key, value, where in items:
        if key in PREFERENCE_DATA_KEYS or (key in dpo_table and key not in sft_table) or (
                key == "loss_type" and is_dpo_loss(value)):
            notes.append(f"{where}: method dpo inferred from '{key}', which only preference trainers take; set "
                         "method: (dpo, kto, orpo, simpo) to choose")
            return items, "dpo"
    return items, "sft"


def is_dpo_loss(value: Any) -> bool:
    """A loss_type value (or list of them) that DPO has and SFT does not."""
    dpo, sft = key_table("dpo")["loss_type"][2] or [], key_table("sft")["loss_type"][2] or []
    values = value if isinstance(value, list) else [value]
    return bool(values) and all(isinstance(v, str) and v in dpo and v not in sft for v in values)


def foreign_key(key: str, method: str) -> str | None:
    """'KEY' is another method's key: say whose, and what to do; None when no method has it."""
    owners = [m for m in methods_with_key(key) if m != method]
    if not owners:
        return None
    names = ", ".join(f"{m} ({METHOD_CONFIGS[m]})" for m in owners)
    fix = "set method: " + " or ".join(owners[:3]) if method == "sft" or owners != ["sft"] else "remove it"
    return f"'{key}' is a key of method {names}, not of {method} ({METHOD_CONFIGS[method]}); {fix}"


def suggest(key: str, table: dict) -> str:
    """A typo's likely key, and where to read about it: `ftkit keys`."""
    close = difflib.get_close_matches(key, list(table) + list(RENAMED), n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{close[0]}'? see: ftkit keys {close[0]})"
    return " (see: ftkit keys)"
