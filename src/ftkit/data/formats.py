"""Normalise a row of any supported format to ftkit's one internal form.

The internal form is `{"messages": [{"role", "content"}, ...]}` for everything except plain `text` rows
(continued pre-training), which stay `{"text": ...}`. Every later stage handles just these two shapes.
Prompt/completion and Alpaca rows become a user turn and an assistant turn, so they go through the chat
template like everything else and training matches what `ftkit chat` sends.
"""

from __future__ import annotations

from typing import Any

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "bot": "assistant", "model": "assistant"}
VALID_ROLES = {"system", "user", "assistant"}


class BadRow(ValueError):
    """A row that cannot become a conversation; the message says why."""


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


def to_internal(row: dict[str, Any], fmt: str, system_prompt: str | None) -> dict[str, Any]:
    if fmt == "text":
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise BadRow("empty or missing 'text'")
        return {"messages": None, "text": text}
    messages = {
        "messages": from_messages,
        "sharegpt": from_sharegpt,
        "alpaca": from_alpaca,
        "prompt_completion": from_prompt_completion,
    }[fmt](row)
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    check_conversation(messages)
    return {"messages": messages, "text": None}


def from_messages(row: dict) -> list[dict]:
    messages = row.get("messages")
    if not isinstance(messages, list):
        raise BadRow("'messages' is not a list of {role, content}")
    out = []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise BadRow("each message needs 'role' and 'content'")
        out.append({"role": str(m["role"]), "content": m["content"] if m["content"] is not None else ""})
    return out


def from_sharegpt(row: dict) -> list[dict]:
    turns = row.get("conversations")
    if not isinstance(turns, list):
        raise BadRow("'conversations' is not a list of {from, value}")
    out = []
    for t in turns:
        if not isinstance(t, dict):
            raise BadRow("each ShareGPT turn is a {from, value} mapping")
        speaker = t.get("from", t.get("role"))
        if speaker not in SHAREGPT_ROLES:
            raise BadRow(f"unknown ShareGPT speaker {speaker!r}; expected one of {sorted(SHAREGPT_ROLES)}")
        out.append({"role": SHAREGPT_ROLES[speaker], "content": t.get("value", t.get("content")) or ""})
    if row.get("system") and (not out or out[0]["role"] != "system"):
        out.insert(0, {"role": "system", "content": row["system"]})
    return out


def from_alpaca(row: dict) -> list[dict]:
    out = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    for pair in row.get("history") or []:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise BadRow("Alpaca 'history' must be a list of [instruction, response] pairs")
        out += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    instruction, extra = row.get("instruction") or "", row.get("input") or ""
    prompt = f"{instruction}\n{extra}" if instruction and extra else instruction or extra
    return out + [{"role": "user", "content": prompt}, {"role": "assistant", "content": row.get("output") or ""}]


def from_prompt_completion(row: dict) -> list[dict]:
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, list) and isinstance(completion, list):  # conversational prompt/completion
        return from_messages({"messages": prompt + completion})
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise BadRow("'prompt' and 'completion' must both be strings or both be message lists")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


def check_conversation(messages: list[dict]) -> None:
    """Roles known, a system turn only first, a user turn first after it, user and assistant alternating, no empty
    assistant turn."""
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow("no assistant turn: nothing to learn from")
    previous = None
    for i, m in enumerate(messages):
        role = m["role"]
        if role not in VALID_ROLES:
            raise BadRow(f"turn {i + 1}: unknown role {role!r} (expected system, user, assistant)")
        if not isinstance(m["content"], str):
            raise BadRow(f"turn {i + 1}: content must be text")
        if role == "system" and i != 0:
            raise BadRow(f"turn {i + 1}: a system turn may only come first")
        if role == "assistant" and previous in (None, "system"):
            raise BadRow(f"turn {i + 1}: the conversation starts with an assistant turn; an answer needs a user turn "
                         "before it")
        if role == "assistant" and not m["content"].strip():
            raise BadRow(f"turn {i + 1}: empty assistant turn")
        if role != "system" and role == previous:
            raise BadRow(f"turn {i + 1}: two {role} turns in a row")
        previous = role
