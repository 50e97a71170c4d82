"""What a chat template does with tool calls, tool results, tool schemas and reasoning, found by rendering probes,
and the messages each template is given accordingly.

Why our own: templates differ in what they expect and drop what they do not read, silently. Qwen2.5's and
Llama-3.1's templates `tojson` the arguments, so a JSON string (as the OpenAI API returns it) would be rendered as
a quoted string; a template without a reasoning field (Qwen2.5, Llama-3.1) would drop `reasoning_content`; a
template without tool support (ChatML) would drop `tool_calls` and `tools`. Probing the template once tells which
form to give it, and data it cannot render is refused instead of trained on with parts missing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable

from ftkit.data.call_syntax import CallSyntax, derive

PROBE_Q, PROBE_A = "ftkitprobequestion", "ftkitprobeanswer"
PROBE_TOOL, PROBE_SCHEMA, PROBE_RESULT = "ftkitprobetool", "ftkitprobeschema", "ftkitproberesult"
PROBE_ARGS = {"ftkitprobearg": "ftkitprobevalue"}
PROBE_OTHER = ("ftkitprobeother", {"ftkitprobearg": "ftkitprobeothervalue"})  # a second call
PROBE_REASONING = "ftkitprobereasoning"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class Features:
    arguments: str | None  # tool-call arguments as "object" or JSON "string"; None: tool calls are not rendered
    tool_results: bool  # a tool message's content is rendered
    tools: bool  # the tool schemas are rendered
    reasoning: bool  # an assistant turn's reasoning_content (or thinking) is rendered
    tool_call_style: str | None  # how the model writes a call: "tagged" (<tool_call>{json}</tool_call>), "json"
    # (Llama-3.1's bare object), "template" (call_syntax: the template's own layout around JSON arguments)
    call_syntax: CallSyntax | None = None


def probe_call(arguments, other=None, content: str = "") -> list[dict]:
    """A user turn and a call of the probe tool (then `other`'s, as (name, arguments), given), after `content`."""
    calls = [(PROBE_TOOL, arguments)] + ([other] if other else [])
    return [{"role": "user", "content": PROBE_Q},
            {"role": "assistant", "content": content, "tool_calls": [
                {"type": "function", "id": f"call_{i}", "function": {"name": name, "arguments": args}}
                for i, (name, args) in enumerate(calls)]}]


def shows_arguments(text: str) -> bool:
    return any(json.dumps(PROBE_ARGS, separators=s) in text for s in ((", ", ": "), (",", ":")))


def detect(render: Callable[..., str]) -> Features:
    """`render(messages, add_generation_prompt=False, tools=None)` renders with the template, raw."""
    def attempt(*args, **kwargs) -> str:
        try:
            return render(*args, **kwargs)
        except Exception:  # a template may raise_exception() on what it does not support
            return ""

    arguments = None
    given = attempt(probe_call(PROBE_ARGS))
    # JSON from the object, or a syntax of the template's own written from it (Gemma 4's call:name{key:value}),
    # but not Python's repr of a dict (a template that prints the arguments as given)
    if shows_arguments(given) or (PROBE_TOOL in given and "ftkitprobevalue" in given and repr(PROBE_ARGS) not in given):
        arguments = "object"
    elif shows_arguments(attempt(probe_call(json.dumps(PROBE_ARGS)))):
        arguments = "string"
    value = PROBE_ARGS if arguments != "string" else json.dumps(PROBE_ARGS)
    result = {"role": "tool", "tool_call_id": "call_0", "name": PROBE_TOOL, "content": PROBE_RESULT}
    tool_results = PROBE_RESULT in attempt(probe_call(value) + [result])
    schema = {"type": "function", "function": {"name": PROBE_SCHEMA, "description": "probe",
                                                "parameters": {"type": "object", "properties": {}}}}
    tools = PROBE_SCHEMA in attempt([{"role": "user", "content": PROBE_Q}], tools=[schema])
    reasoning = PROBE_REASONING in attempt([{"role": "user", "content": PROBE_Q}, {
        "role": "assistant", "content": PROBE_A, "reasoning_content": PROBE_REASONING}])
    style, syntax = None, None
    if arguments:
        prompt = attempt(probe_call(value)[:1], add_generation_prompt=True)
        turn = generated(attempt(probe_call(value)), prompt)
        style = "tagged" if "<tool_call>" in turn else "json" if turn.lstrip().startswith("{") else None
        if style is None:
            other = PROBE_OTHER if arguments == "object" else (PROBE_OTHER[0], json.dumps(PROBE_OTHER[1]))
            syntax = derive(turn, generated(attempt(probe_call(value, other)), prompt),
                            generated(attempt(probe_call(value, content=PROBE_A)), prompt),
                            PROBE_TOOL, PROBE_ARGS, PROBE_OTHER, PROBE_A)
            style = "template" if syntax else None
    return Features(arguments, tool_results, tools, reasoning, style, syntax)


def generated(rendered: str, prompt: str) -> str:
    """The last turn of `rendered` as a model continuing `prompt` writes it: after the prompt, or where the template
    renders the turn otherwise than it prompts for it (DeepSeek-V3 prompts `<think>\\n`), after their common part."""
    if rendered.startswith(prompt):
        return rendered[len(prompt):]
    common = os.path.commonprefix([rendered, prompt])
    if common.rfind("<") > common.rfind(">"):  # not inside a token both share the start of (<｜Assistant｜><...)
        common = common[:common.rfind("<")]
    return rendered[len(common):]


def for_template(messages: list[dict], features: Features) -> list[dict]:
    """Messages in the form this template renders: arguments as it expects them, reasoning in its field or, for a
    template without one, inline as <think>...</think> before the answer; ftkit's own keys removed."""
    out = []
    for m in messages:
        if m["role"] != "assistant":
            out.append(m)
            continue
        m = {k: v for k, v in m.items() if k != "weight"}
        if m.get("tool_calls") and features.arguments == "string":
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.dumps(
                c["function"]["arguments"], ensure_ascii=False)}} for c in m["tool_calls"]]
        reasoning = m.get("reasoning_content")
        if reasoning is not None and not features.reasoning:
            m.pop("reasoning_content")
            m["content"] = f"{THINK_OPEN}\n{reasoning.strip()}\n{THINK_CLOSE}\n\n{m['content'].lstrip()}"
        elif reasoning is None and features.reasoning and m["content"].lstrip().startswith(THINK_OPEN) \
                and THINK_CLOSE in m["content"]:
            thought, _, answer = m["content"].lstrip()[len(THINK_OPEN):].partition(THINK_CLOSE)
            m["reasoning_content"], m["content"] = thought.strip("\n"), answer.lstrip("\n")
        out.append(m)
    return out


def unsupported(messages: list[dict], tools: list | None, features: Features) -> str | None:
    """What this conversation has that the template would drop: '<what> (turn N)', or None."""
    if tools and not features.tools:
        return "does not show `tools` (function schemas) to the model"
    for i, m in enumerate(messages, 1):
        if m.get("tool_calls") and features.arguments is None:
            return f"does not render tool calls (turn {i} has tool_calls)"
        if m["role"] == "tool" and not features.tool_results:
            return f"does not render tool results (turn {i} is a tool message)"
    return None
