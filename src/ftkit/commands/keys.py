"""`ftkit keys [PATTERN]`: every recipe key with its owner, type, default and help, from the same tables that
validate recipes (config/arguments.py for ftkit's keys, the SFTConfig snapshot for TRL's), so the list can never
disagree with validation. No torch, no trl: it answers in well under a second.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import json
import re
from dataclasses import dataclass

from ftkit.config.schema import IGNORED, RENAMED, SECTIONS, key_table, sft_schema
from ftkit.errors import FtkitError
from ftkit.train.args import SFT_DEFAULTS
from ftkit.train.defaults import DESCRIBED

OWNERS = {"model": "model", "data": "data", "run": "run", "sft": "SFTConfig"}
OWNER_LONG = {"model": "ftkit's model keys (all of TRL's ModelConfig), config/arguments.py",
              "data": "ftkit's data keys (alignment-handbook's names), config/arguments.py",
              "run": "ftkit's run keys, config/arguments.py",
              "sft": "TRL's SFTConfig (with transformers' TrainingArguments), passed to the trainer"}


def yaml_value(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


# SFTConfig keys whose value ftkit decides where the recipe says nothing (Recipe.output_dir, config/precision.py,
# train/args.py's SFT_DEFAULTS, train/defaults.py's measured defaults).
FTKIT_DEFAULTS = {
    "output_dir": "runs/<recipe file name>",
    "bf16": "on where the GPU supports bf16, else off",
    "fp16": "false",
    "use_cpu": "true when there is no GPU",
    **{key: yaml_value(value) for key, value in SFT_DEFAULTS.items()},
    **DESCRIBED,
}


@dataclass
class Key:
    name: str
    owner: str
    kinds: list[str]
    default: object
    choices: list | None
    help: str

    def type_text(self) -> str:
        kinds = [k for k in self.kinds if k != "null"]
        return " | ".join(kinds) + (" | null" if "null" in self.kinds else "")

    def default_text(self) -> str:
        if self.name in FTKIT_DEFAULTS:
            return FTKIT_DEFAULTS[self.name]
        return yaml_value(self.default)

    def first_sentence(self) -> str:
        match = re.match(r"(.+?(?<!e\.g)(?<!i\.e)[.!?])(\s|$)", self.help)
        return match.group(1) if match else self.help


def all_keys() -> dict[str, Key]:
    keys: dict[str, Key] = {}
    table = key_table()
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            _, kinds, choices = table[f.name]
            keys[f.name] = Key(f.name, section, kinds, default, choices, clean(f.metadata.get("help", "")))
    for name, spec in sft_schema().items():
        _, kinds, choices = table[name]
        keys.setdefault(name, Key(name, "sft", kinds, spec["default"], choices, clean(spec.get("help") or "")))
    return dict(sorted(keys.items()))


def clean(text: str) -> str:
    """One line; argparse's %% escapes (in TRL's help) undone."""
    return " ".join(text.replace("%%", "%").split())


def matching(pattern: str | None, keys: dict[str, Key]) -> list[Key]:
    """Keys whose name contains `pattern` (or matches it as a glob: lora_*); none: those whose help mentions it."""
    if not pattern:
        return list(keys.values())
    needle = pattern.lower()
    if any(c in pattern for c in "*?["):
        return [k for k in keys.values() if fnmatch.fnmatch(k.name, needle)]
    found = [k for k in keys.values() if needle in k.name]
    return found or [k for k in keys.values() if needle in k.help.lower()]


def listing(keys: list[Key], width: int | None) -> list[str]:
    """Aligned columns: key, owner, type, default, the first sentence of the help (cut to `width` if given)."""
    from ftkit.cells import clip, pad

    rows = [("key", "owner", "type", "default", "help")]
    rows += [(k.name, OWNERS[k.owner], k.type_text(), clip(k.default_text(), 24), k.first_sentence()) for k in keys]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for row in rows:
        line = "  ".join(pad(cell, w) for cell, w in zip(row[:4], widths)) + "  " + row[4]
        lines.append(clip(line, width) if width else line)
    return lines


def full(key: Key) -> list[str]:
    lines = [key.name, f"  owner:   {OWNERS[key.owner]}: {OWNER_LONG[key.owner]}", f"  type:    {key.type_text()}",
             f"  default: {key.default_text()}"]
    if key.choices:
        lines.append(f"  choices: {', '.join(str(c) for c in key.choices)}")
    older = [old for old, new in RENAMED.items() if new == key.name]
    if older:
        lines.append(f"  older names, still accepted: {', '.join(older)}")
    return lines + ["", f"  {key.help or '(no help text)'}"]


def run_keys(pattern: str | None, as_json: bool = False, width: int | None = None, echo=print) -> None:
    keys = all_keys()
    name = (pattern or "").strip()
    if name in RENAMED and RENAMED[name] in keys:
        echo(f"{name}: an older name of {RENAMED[name]} (accepted, with a note)\n")
        name = RENAMED[name]
    if name in IGNORED:
        echo(f"{name}: no longer used ({IGNORED[name]}); a recipe may still carry it, and it is ignored with a note")
        return
    if name in keys:
        echo(json.dumps(keys[name].__dict__, default=str) if as_json else "\n".join(full(keys[name])))
        return
    found = matching(name, keys)
    if not found:
        close = difflib.get_close_matches(name, list(keys), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise FtkitError(f"no recipe key matches '{name}'{hint}; `ftkit keys` lists every key")
    if as_json:
        echo(json.dumps([k.__dict__ for k in found], indent=2, default=str))
        return
    echo("\n".join(listing(found, width)))
