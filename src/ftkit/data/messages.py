"""Messages as chat templates expect them: roles, text content, tool calls, tool results and reasoning in one
form, and the rules a trainable conversation follows.

Why our own: the same things arrive in several dialects (the OpenAI API's JSON-string `arguments`, Hugging Face's
object `arguments`, the legacy `function_call`/`functions` form, LLaMA-Factory's function_call/observation turns,
multi-part `content`, `reasoning_content`/`thinking`/`reasoning`), and a template silently drops a key it does not
read. Every source format ends here, so training, predict and serve see one form.

The form: {"role": system|user|assistant|tool, "content": str, plus on assistant turns "tool_calls":
[{"type": "function", "function": {"name", "arguments": {object}}, "id"?}], "reasoning_content" and "weight"
(0: not trained, OpenAI's fine-tuning key), on tool turns "tool_call_id" and "name"}. Keys without a value are
left out, since templates test for a key's presence (Llama-3.1: `'tool_calls' in message`).
"""

from __future__ import annotations

import json
from typing import Any

from ftkit.config.templates import normalise_tools  # noqa: F401 (re-exported for data's callers)
from ftkit.errors import BadRow

ROLE_ALIASES = {"developer": "system", "function": "tool", "ipython": "tool", "observation": "tool"}
VALID_ROLES = ("system", "user", "assistant", "tool")
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
TEXT_PARTS = ("text", "input_text", "output_text")


def normalise_messages(raw: Any) -> list[dict]:
    if not isinstance(raw, list):
        raise BadRow("'messages' is not a list of {role, content}")
    return [normalise_message(m, number) for number, m in enumerate(raw, 1)]


def normalise_message(raw: Any, number: int) -> dict:
    if not isinstance(raw, dict) or "role" not in raw or not ({"content", "tool_calls", "function_call"} & set(raw)):
        raise BadRow("each message needs 'role' and 'content'")
    where = f"turn {number}"
    role = str(raw["role"])
    role = ROLE_ALIASES.get(role, role)
    out: dict[str, Any] = {"role": role, "content": content_text(raw.get("content"), where, role == "tool")}
    if role == "assistant":
        calls = raw.get("tool_calls")
        if calls in (None, []) and isinstance(raw.get("function_call"), dict):  # OpenAI's legacy form
            calls = [{"type": "function", "function": raw["function_call"]}]
        if calls not in (None, []):
            out["tool_calls"] = tool_calls(calls, where)
        reasoning = next((raw[k] for k in REASONING_KEYS if raw.get(k) not in (None, "")), None)
        if reasoning is not None:
            if not isinstance(reasoning, str):
                raise BadRow(f"{where}: reasoning must be text")
            out["reasoning_content"] = reasoning
        if raw.get("weight") is not None:
            if raw["weight"] not in (0, 1) or isinstance(raw["weight"], bool):
                raise BadRow(f"{where}: 'weight' must be 0 (not trained) or 1, got {raw['weight']!r}")
            if raw["weight"] == 0:
                out["weight"] = 0
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if isinstance(raw.get(key), str) and raw[key]:
                out[key] = raw[key]
    return out


def content_text(content: Any, where: str, tool: bool = False) -> str:
    """Text, multi-part text joined with newlines (as vLLM joins them); a tool result may be JSON data."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and "type" in p for p in content) and content:
        texts = []
        for part in content:
            if part["type"] not in TEXT_PARTS or not isinstance(part.get("text"), str):
                raise BadRow(f"{where}: a content part of type {part['type']!r} is not text; ftkit trains text-only "
                             "models (images, audio and files are not supported yet)")
            texts.append(part["text"])
        return "\n".join(texts)
    if tool and isinstance(content, (dict, list, int, float, bool)):
        return json.dumps(content, ensure_ascii=False)
    raise BadRow(f"{where}: content must be text")


def tool_calls(raw: Any, where: str) -> list[dict]:
    """OpenAI's [{type, id, function: {name, arguments}}] or flat [{name, arguments}]; arguments become objects."""
    if not isinstance(raw, list):
        raise BadRow(f"{where}: 'tool_calls' must be a list of {{type: function, function: {{name, arguments}}}}")
    calls = []
    for call in raw:
        function = call.get("function", call) if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name.strip():
            raise BadRow(f"{where}: each tool call needs a function name: {{type: function, function: {{name, "
                         "arguments}}")
        arguments = function.get("arguments", function.get("parameters"))
        out = {"type": "function", "function": {"name": name, "arguments": call_arguments(arguments, name, where)}}
        if isinstance(call.get("id"), str) and call["id"]:
            out["id"] = call["id"]
        calls.append(out)
    return calls


def call_arguments(arguments: Any, name: str, where: str) -> dict:
    if arguments is None or arguments == "":
        return {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            raise BadRow(f"{where}: the arguments of tool call '{name}' are not valid JSON") from None
    if not isinstance(arguments, dict):
        raise BadRow(f"{where}: the arguments of tool call '{name}' must be a JSON object, got "
                     f"{type(arguments).__name__}")
    return arguments


def first_problem(messages: list[dict]) -> str | None:
    """Why `messages` cannot be trained on, or None: roles known, a system turn only first, a user turn before the
    first answer, no two user or two assistant turns in a row, tool results after a tool call, no empty answer."""
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant turn: nothing to learn from"
    previous: dict | None = None
    for i, m in enumerate(messages):
        role, where = m["role"], f"turn {i + 1}"
        if role not in VALID_ROLES:
            return f"{where}: unknown role {role!r} (expected {', '.join(VALID_ROLES)})"
        before = previous["role"] if previous else None
        if role == "system" and i != 0:
            return f"{where}: a system turn may only come first"
        if role == "assistant" and before in (None, "system"):
            return f"{where}: the conversation starts with an assistant turn; an answer needs a user turn before it"
        if role == "assistant" and not (m["content"].strip() or m.get("tool_calls") or m.get("reasoning_content")):
            return f"{where}: empty assistant turn"
        if role == "tool" and not answers_a_call(previous):
            return f"{where}: a tool result must follow an assistant turn that calls a tool"
        if role in ("user", "assistant") and role == before:
            return f"{where}: two {role} turns in a row"
        previous = m
    return None


def answers_a_call(previous: dict | None) -> bool:
    """Whether a tool result may come after `previous`: an assistant turn with tool calls, or another result."""
    return bool(previous) and (previous["role"] == "tool" or
                               (previous["role"] == "assistant" and bool(previous.get("tool_calls"))))


def orphan_tool_result(messages: list[dict]) -> str | None:
    """The first tool result that answers no tool call, named by turn (OpenAI refuses such a request too)."""
    for i, m in enumerate(messages):
        if m["role"] == "tool" and not answers_a_call(messages[i - 1] if i else None):
            return f"turn {i + 1}: a tool result must follow an assistant turn that calls a tool"
    return None


def check_conversation(messages: list[dict]) -> None:
    problem = first_problem(messages)
    if problem:
        raise BadRow(problem)
