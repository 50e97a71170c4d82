"""A generated answer read back into its parts: reasoning, text, and tool calls in the syntax the chat template
taught the model.

Supported call syntaxes (ChatFormat.tool_call_style, found by rendering probe calls): "tagged", Qwen2.5's and
Qwen3's (and Hermes') `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks; "json", Llama-3.1's bare
`{"name": ..., "parameters": {...}}` answer (also a list of them, or several separated by ";"); and for any other
template that writes the arguments as JSON, its own layout read off its rendering (data/call_syntax.py: gpt-oss's
` to=functions.NAME<|channel|>commentary json<|message|>{...}<|call|>`, DeepSeek-V3's
`<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME ```json {...}````, Mistral-like `[TOOL_CALLS][{...}]`). Calls whose
arguments are not JSON (Gemma 4, LFM2, Qwen3.5's and GLM-4.5's XML parameters) stay text, as does anything that
does not parse. Why our own: transformers' response parsing needs a per-model schema most tokenizers lack.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from ftkit.data.call_syntax import CallSyntax, read_calls

TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
THINK = re.compile(r"^\s*<think>(.*?)</think>\s*", re.S)


@dataclass
class Reply:
    content: str
    reasoning: str | None = None
    tool_calls: list[dict] = field(default_factory=list)  # [{"name", "arguments": {...}}]


def parse_reply(text: str, style: str | CallSyntax | None) -> Reply:
    """Split a leading <think>...</think> off as reasoning; read tool calls when `style` names a syntax (or is the
    template's own). Text that does not parse as calls (malformed JSON, a missing name) stays content, whole."""
    reasoning, original = None, text
    found = THINK.match(text)
    if found:
        reasoning, text = found.group(1).strip() or None, text[found.end():]
    calls: list[dict] = []
    if style == "tagged" and TAGGED.search(text):
        parsed = [as_call(body) for body in TAGGED.findall(text)]
        if all(parsed):
            calls, text = parsed, TAGGED.sub("", text)
    elif style == "json" and text.strip().startswith(("{", "[")):
        parsed = json_calls(text.strip())
        if parsed:
            calls, text = parsed, ""
    elif isinstance(style, CallSyntax):
        parsed = read_calls(text, style)
        if parsed:
            text, calls = parsed
    if not found and not calls:
        return Reply(original)
    return Reply(text.strip(), reasoning, calls)


def as_call(body) -> dict | None:
    """{"name", "arguments"|"parameters"} (JSON text or parsed) -> {"name", "arguments"}, or None."""
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except ValueError:
            return None
    if not isinstance(body, dict) or not isinstance(body.get("name"), str):
        return None
    arguments = body.get("arguments", body.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    return {"name": body["name"], "arguments": arguments} if isinstance(arguments, dict) else None


def json_calls(text: str) -> list[dict]:
    try:
        data = json.loads(text)
    except ValueError:
        data = None
        parts = [part.strip() for part in text.split(";") if part.strip()]
        if len(parts) > 1:
            parsed = [as_call(part) for part in parts]
            return parsed if all(parsed) else []
    items = data if isinstance(data, list) else [data]
    parsed = [as_call(item) for item in items]
    return parsed if parsed and all(parsed) else []


def openai_tool_calls(calls: list[dict]) -> list[dict]:
    """OpenAI's response form: arguments as JSON text, an id per call."""
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for c in calls]


def history_message(reply: Reply) -> dict:
    """The assistant message to keep in a conversation's history (ftkit's message form, data/messages.py)."""
    message: dict = {"role": "assistant", "content": reply.content}
    if reply.reasoning:
        message["reasoning_content"] = reply.reasoning
    if reply.tool_calls:
        message["tool_calls"] = [{"type": "function", "id": call["id"], "function": {
            "name": call["function"]["name"], "arguments": json.loads(call["function"]["arguments"])}}
            for call in openai_tool_calls(reply.tool_calls)]
    return message
