"""The OpenAI request and response shapes `ftkit serve` speaks, as pydantic models and small builders.

FastAPI validates every request against these models, so a NaN temperature, an infinite max_tokens or a
seed past 2**32 is answered 400 before it reaches generation. Fields OpenAI defines that a local model cannot
honour (logprobs, penalties other than 0, echo) are refused by name rather than silently ignored; fields
that change nothing here (user, metadata, ...) are ignored, as vLLM does.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ftkit.data.call_syntax import CallSyntax

MAX_N = 16  # choices (times prompts) per request: each is one more row in the batch


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """Fields /v1/chat/completions and /v1/completions share; None means the server's default."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    min_tokens: int | None = Field(None, ge=0)  # vLLM's extension: no end of turn before this many tokens
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1)  # vLLM's extension; -1 and 0 mean no limit
    repetition_penalty: float | None = Field(None, gt=0, le=10, allow_inf_nan=False)
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = Field(None, ge=0, lt=2**32)
    logprobs: Any = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop strings")
        return [s for s in stops if s]

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _penalty(cls, value):
        if value:
            raise ValueError("not supported by ftkit serve (only 0); use repetition_penalty")
        return value

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, value):
        if value not in (None, False, 0):
            raise ValueError("logprobs are not supported by ftkit serve")
        return None

    def limit(self) -> int | None:
        return self.max_tokens

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None
    name: str | None = None
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    def for_template(self, number: int = 1) -> dict:
        """The message in ftkit's form, as training data is read (data/messages.py): multi-part text joined,
        tool-call arguments as objects; raises BadRow on what cannot be (an image part, arguments not JSON)."""
        from ftkit.data.messages import normalise_message

        raw = self.model_dump(exclude_none=True)
        raw.setdefault("content", "")
        return normalise_message(raw, number)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[dict] | None = None
    tool_choice: Any = None
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's extension, e.g. {"enable_thinking": false}

    @model_validator(mode="after")
    def _ends_with_a_question(self):
        if self.messages[-1].role not in ("user", "tool"):
            raise ValueError("the last message must be a user (or tool) turn")
        return self

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(Sampling):
    prompt: str | list[str] = Field(min_length=1)
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value):
        prompts = [value] if isinstance(value, str) else value
        if len(prompts) > MAX_N:
            raise ValueError(f"at most {MAX_N} prompts per request")
        if not all(prompts):
            raise ValueError("a prompt is empty")
        return prompts

    @model_validator(mode="after")
    def _supported(self):
        if self.echo or self.suffix:
            raise ValueError("echo and suffix are not supported by ftkit serve")
        if len(self.prompt) * self.n > MAX_N:
            raise ValueError(f"prompts times n must be at most {MAX_N}")
        return self


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def validation_error_body(errors: list[dict]) -> dict:
    """FastAPI's RequestValidationError details as one OpenAI error: every problem named, the first as param."""
    def where(error: dict) -> str:
        return ".".join(str(part) for part in error["loc"] if part != "body")

    if errors and errors[0].get("type") == "json_invalid":
        detail = (errors[0].get("ctx") or {}).get("error", "")
        return error_body(f"the request body is not valid JSON: {detail}".rstrip(": "))
    if errors and not where(errors[0]) and errors[0].get("type") in ("missing", "model_attributes_type"):
        empty = errors[0]["type"] == "missing"  # else the body is not an object, or was not sent as JSON
        return error_body("the request body is empty: send a JSON object" if empty else
                          "the request body must be a JSON object, sent with Content-Type: application/json")
    problems = [f"{where(e)}: {e['msg'].removeprefix('Value error, ')}" if where(e) else
                e["msg"].removeprefix("Value error, ") for e in errors]
    param = where(errors[0]) if errors else ""
    return error_body("; ".join(problems) or "invalid request", param=param or None)


def head(kind: str, model: str) -> dict:
    prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
    return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "object": kind, "created": int(time.time()), "model": model}


def usage(prompt_tokens: int, choices) -> dict:
    completion = sum(choice.tokens for choice in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def chat_response(model: str, choices, used: dict, style: str | CallSyntax | None = None) -> dict:
    """`style`: the tool-call syntax to read back into `tool_calls` (when the request had tools)."""
    return {**head("chat.completion", model), "usage": used, "choices": [
        {"index": i, **chat_message(c, style), "logprobs": None} for i, c in enumerate(choices)]}


def chat_message(choice, style: str | CallSyntax | None) -> dict:
    """{"message": ..., "finish_reason": ...}: reasoning in a leading <think> block goes to `reasoning_content`,
    tool calls in the template's syntax to `tool_calls` (finish_reason "tool_calls")."""
    from ftkit.inference.replies import openai_tool_calls, parse_reply

    reply = parse_reply(choice.text, style)
    message: dict = {"role": "assistant", "content": reply.content}
    if reply.reasoning:
        message["reasoning_content"] = reply.reasoning
    if reply.tool_calls:
        message["tool_calls"] = openai_tool_calls(reply.tool_calls)
        message["content"] = reply.content or None
        return {"message": message, "finish_reason": "tool_calls"}
    return {"message": message, "finish_reason": choice.finish_reason}


def completion_response(model: str, choices, used: dict) -> dict:
    return {**head("text_completion", model), "usage": used, "choices": [
        {"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
        for i, c in enumerate(choices)]}


def chat_chunk(top: dict, index: int, delta: dict, finish: str | None = None) -> dict:
    return {**top, "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}]}


def completion_chunk(top: dict, index: int, text: str, finish: str | None = None) -> dict:
    return {**top, "choices": [{"index": index, "text": text, "finish_reason": finish, "logprobs": None}]}
