"""Built-in chat templates and resolving a recipe's `chat_template` to Jinja text (no torch import).

Each built-in is `templates/NAME.jinja` beside this module (package data), read once at import. The files
end with a newline for editors' sake; the template text is the file without it, so token caches keyed on
the text stay valid.
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from typing import Any

from ftkit.errors import BadRow

# chatml, llama3, gemma: the families' own formats. llama2: Llama-2 chat (seed 001's [INST] <<SYS>> format), no
# generation-prompt branch, system folded into turn one. alpaca: for base models without a template (seed 003):
# every answer ends with eos, so the model learns to stop. The order is the one error messages list them in.
BUILTIN_NAMES = ("chatml", "llama3", "gemma", "llama2", "alpaca")


def builtin_template(name: str) -> str:
    """The text of built-in template `name` (KeyError if there is none)."""
    if name not in BUILTIN_NAMES:
        raise KeyError(name)
    text = (files("ftkit.config") / "templates" / f"{name}.jinja").read_text(encoding="utf-8")
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


# apply_chat_template's own arguments and the variables ftkit sets: a template kwarg of that name would clash.
RESERVED_TEMPLATE_KWARGS = ("messages", "tools", "documents", "add_generation_prompt", "continue_final_message",
                            "tokenize", "chat_template", "return_dict", "return_tensors", "tokenizer_kwargs",
                            "bos_token", "eos_token")


def template_kwargs_problem(kwargs: Any) -> str | None:
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        return "must be a mapping of template variables, e.g. {enable_thinking: false}"
    clash = [k for k in kwargs if k in RESERVED_TEMPLATE_KWARGS]
    if clash:
        return f"may not set {', '.join(clash)}: ftkit passes {'it' if len(clash) == 1 else 'them'} to the template itself"
    return None


def json_value(raw: Any, where: str) -> Any:
    """A column that holds a value or that value as JSON text (as LLaMA-Factory and CSV files store them);
    None for an empty cell."""
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str):
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        raise BadRow(f"{where} is not valid JSON") from None


def normalise_tools(raw: Any, where: str = "'tools'") -> list[dict] | None:
    """Function schemas (a list, or that list as JSON text, as LLaMA-Factory stores it) in OpenAI's form
    {type: function, function: {name, description, parameters}}; a bare {name, ...} is wrapped."""
    raw = json_value(raw, where)
    if raw is None or raw == []:
        return None
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list):
        raise BadRow(f"{where} must be a list of function schemas {{name, description, parameters}}")
    tools = []
    for tool in raw:
        function = tool.get("function") if isinstance(tool, dict) and isinstance(tool.get("function"), dict) else tool
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadRow(f"{where}: each tool needs a name (a function schema {{name, description, parameters}})")
        parameters = json_value(function.get("parameters"), f"{where}: the parameters of tool '{function['name']}'")
        if parameters is not None and not isinstance(parameters, dict):
            raise BadRow(f"{where}: the parameters of tool '{function['name']}' must be a JSON schema object, got "
                         f"{type(parameters).__name__}")
        if parameters is not None:  # JSON text (as some exports store it) becomes the object templates render
            function = {**function, "parameters": parameters}
        tools.append({"type": "function", "function": function})
    return tools or None
