"""Normalise a row of any supported format to ftkit's one internal form.

The internal form is `{"messages": [...], "tools": [...] | None, "chat_template_kwargs": {...} | None}` (messages
as data/messages.py defines them) for everything except plain `text` rows (continued pre-training), which stay
`{"text": ...}`. Every later stage handles just these two shapes. Prompt/completion and Alpaca rows become a user
turn and an assistant turn, so they go through the chat template like everything else and training matches what
`ftkit chat` sends.
"""

from __future__ import annotations

import json
from typing import Any

from ftkit.config.sources import FORMATS
from ftkit.config.templates import json_value, template_kwargs_problem
from ftkit.data.messages import BadRow, check_conversation, normalise_messages, normalise_tools

__all__ = ["BadRow", "FORMATS", "detect_format", "to_internal", "conversation_parts"]

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "bot": "assistant", "model": "assistant", "function_call": "assistant", "observation": "tool",
                  "tool": "tool"}

def detect_format(columns: list[str]) -> str:
    cols = set(columns)
    if "messages" in cols:
        return "messages"
    if "conversations" in cols:
        return "sharegpt"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if "text" in cols:
        return "text"
    raise BadRow(
        f"cannot tell the format from columns {sorted(cols)}; tried messages, conversations (ShareGPT), "
        "instruction/output (Alpaca), prompt/completion, text. Map your columns with dataset_mixture "
        "`columns: {your_question: prompt, your_answer: completion}`"
    )


def to_internal(row: dict[str, Any], fmt: str, system_prompt: str | None,
                tools: list[dict] | None = None) -> dict[str, Any]:
    """One row -> the internal form; `tools` (the source's schemas) apply where the row has none of its own."""
    if fmt == "text":
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise BadRow("empty or missing 'text'")
        return {"messages": None, "text": text, "tools": None, "chat_template_kwargs": None}
    messages, row_tools, kwargs = conversation_parts(row, fmt, system_prompt)
    check_conversation(messages)
    return {"messages": messages, "text": None, "tools": row_tools or tools, "chat_template_kwargs": kwargs}


def conversation_parts(row: dict, fmt: str, system_prompt: str | None) -> tuple[list[dict], list | None, dict | None]:
    """(messages, the row's tools, the row's chat_template_kwargs), not yet checked as a whole conversation."""
    messages = normalise_messages(READERS[fmt](row))
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    tools = normalise_tools(row.get("tools"))
    if tools is None and row.get("functions"):  # OpenAI's legacy function-calling column
        tools = normalise_tools(row["functions"], "'functions'")
    return messages, tools, template_kwargs(row.get("chat_template_kwargs"), "'chat_template_kwargs'")


def template_kwargs(raw: Any, where: str) -> dict | None:
    """A row's chat_template_kwargs: a mapping (or that mapping as JSON text), e.g. {"enable_thinking": false}. A
    null value is left out: in a hub dataset it is Arrow's filler for a key other rows have (smoltalk2)."""
    raw = json_value(raw, where)
    if raw is None or raw == {}:
        return None
    problem = template_kwargs_problem(raw)
    if problem:
        raise BadRow(f"{where} {problem}")
    return {k: v for k, v in raw.items() if v is not None} or None


def from_messages(row: dict) -> list:
    return row.get("messages")


def from_sharegpt(row: dict) -> list[dict]:
    """ShareGPT turns, with LLaMA-Factory's function calling: a `function_call` turn holds {name, arguments} (or a
    list of them) as JSON, an `observation` turn the tool's result."""
    turns = row.get("conversations")
    if not isinstance(turns, list):
        raise BadRow("'conversations' is not a list of {from, value}")
    out = []
    for number, t in enumerate(turns, 1):
        if not isinstance(t, dict):
            raise BadRow("each ShareGPT turn is a {from, value} mapping")
        speaker = t.get("from", t.get("role"))
        if speaker not in SHAREGPT_ROLES:
            raise BadRow(f"unknown ShareGPT speaker {speaker!r}; expected one of {sorted(SHAREGPT_ROLES)}")
        value = t.get("value", t.get("content"))
        if speaker == "function_call":
            out.append({"role": "assistant", "content": "", "tool_calls": sharegpt_calls(value, number)})
        else:
            out.append({"role": SHAREGPT_ROLES[speaker], "content": value or ""})
    if row.get("system") and (not out or out[0]["role"] != "system"):
        out.insert(0, {"role": "system", "content": row["system"]})
    return out


def sharegpt_calls(value: Any, number: int) -> list[dict]:
    try:
        calls = json.loads(value) if isinstance(value, str) else value
    except ValueError:
        calls = None
    calls = [calls] if isinstance(calls, dict) else calls
    if not isinstance(calls, list) or not calls or not all(isinstance(c, dict) for c in calls):
        raise BadRow(f"turn {number}: a function_call turn's value must be JSON {{\"name\": ..., \"arguments\": "
                     "{...}} (or a list of them)")
    return [{"type": "function", "function": c} for c in calls]


def from_alpaca(row: dict) -> list[dict]:
    out = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    for pair in row.get("history") or []:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise BadRow("Alpaca 'history' must be a list of [instruction, response] pairs")
        out += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    instruction, extra = row.get("instruction") or "", row.get("input") or ""
    prompt = f"{instruction}\n{extra}" if instruction and extra else instruction or extra
    return out + [{"role": "user", "content": prompt}, {"role": "assistant", "content": row.get("output") or ""}]


def from_prompt_completion(row: dict) -> list:
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, list) and isinstance(completion, list):  # conversational prompt/completion
        return prompt + completion
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise BadRow("'prompt' and 'completion' must both be strings or both be message lists")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


READERS = {"messages": from_messages, "sharegpt": from_sharegpt, "alpaca": from_alpaca,
           "prompt_completion": from_prompt_completion}
