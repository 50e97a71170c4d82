"""Built-in chat templates and resolving a recipe's `chat_template` to Jinja text (no torch import).

Each built-in is `templates/NAME.jinja` beside this module (package data), read once at import. The files
end with a newline for editors' sake; the template text is the file without it, so token caches keyed on
the text stay valid.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

# chatml, llama3, gemma: the families' own formats. llama2: Llama-2 chat (seed 001's [INST] <<SYS>> format), no
# generation-prompt branch, system folded into turn one. alpaca: for base models without a template (seed 003):
# every answer ends with eos, so the model learns to stop. The order is the one error messages list them in.
BUILTIN_NAMES = ("chatml", "llama3", "gemma", "llama2", "alpaca")


def builtin_template(name: str) -> str:
    """The text of built-in template `name` (KeyError if there is none)."""
    if name not in BUILTIN_NAMES:
        raise KeyError(name)
    text = (files("ftkit.data") / "templates" / f"{name}.jinja").read_text(encoding="utf-8")
    return text.removesuffix("\n")


BUILTIN_TEMPLATES: dict[str, str] = {name: builtin_template(name) for name in BUILTIN_NAMES}


def resolve_template(spec: str | None) -> str | None:
    """A built-in name, a Jinja file, or inline Jinja -> template text (None: use the tokenizer's own)."""
    if not spec:
        return None
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec]
    if "{" in spec:
        return spec
    return Path(spec).expanduser().read_text(encoding="utf-8")
