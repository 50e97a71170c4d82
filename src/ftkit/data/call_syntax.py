"""A chat template's own tool-call syntax, read off its rendering of probe calls, for templates that write the
arguments as JSON in a layout of their own: gpt-oss's harmony (` to=functions.NAME<|channel|>commentary
json<|message|>{ARGS}<|call|>`), DeepSeek-V3's (`<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\n{ARGS}\\n````),
Mistral's (`[TOOL_CALLS][{"name": "NAME", "arguments": {ARGS}}]`) and the like.

Why our own: transformers' response parsing needs a per-model schema most tokenizers lack; the template itself
already says where a call's name and arguments go. The probe call's rendering is cut at the probe name and the
probe arguments into prefix, name, middle, arguments, tail; a rendering with two calls gives the separator
between one call and the next; one with text beside the call gives what the template writes around that text.
Arguments are decoded with json's raw_decode, so nested objects need no help from the layout. Templates whose
arguments are not JSON (Gemma 4's `call:NAME{key:<|"|>value<|"|>}`, LFM2's `[NAME(key='value')]`, Qwen3.5's and
GLM-4.5's XML parameters) get no syntax: their calls stay text.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, fields, replace

NAME = re.compile(r"\w[\w.:/-]*")  # a function name as templates write it: no spaces, quotes or brackets
DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class CallSyntax:
    prefix: str  # before the first call's name (never only whitespace)
    middle: str  # between a name and its arguments
    separator: str | None  # between one call's arguments and the next call's name; None: one call a turn
    tail: str  # after the last call's arguments, to the end of the turn
    content_open: str = ""  # what the template writes before text given beside the calls
    content_close: str = ""  # ... and after it, before the calls

    def without(self, hidden) -> CallSyntax:
        """The syntax as decoded text shows it: `hidden` (tokens decoding skips, e.g. gpt-oss's <|channel|>) removed."""
        def strip(text):
            for token in sorted(hidden, key=len, reverse=True):
                text = text.replace(token, "") if token and text else text
            return text
        return replace(self, **{f.name: strip(getattr(self, f.name)) for f in fields(self)})


def json_at(text: str, start: int, value) -> tuple[int, int] | None:
    """The span of the first JSON text at or after `start` that decodes to `value`."""
    at = text.find("{", start)
    while at >= 0:
        try:
            found, end = DECODER.raw_decode(text, at)
            if found == value:
                return at, end
        except ValueError:
            pass
        at = text.find("{", at + 1)
    return None


def derive(one: str, two: str, said: str, name: str, arguments: dict, other: tuple[str, dict],
           text: str) -> CallSyntax | None:
    """The syntax of the turns `one` (a call of `name` with `arguments`), `two` (that call, then `other`) and `said`
    (`text`, then the call), each as generated; None where the arguments are not JSON after the name."""
    at = one.find(name)
    span = json_at(one, at + len(name), arguments) if at >= 0 else None
    if span is None or not one[:at].strip():
        return None
    prefix, middle, tail = one[:at], one[at + len(name):span[0]], one[span[1]:]
    separator = None
    first = json_at(two, two.find(name) + len(name), arguments) if name in two else None
    if first:
        second = two.find(other[0], first[1])
        if second >= 0 and json_at(two, second + len(other[0]), other[1]):
            separator = two[first[1]:second]
    opening = closing = ""
    start, call = said.find(text), said.find(prefix.strip())
    if 0 <= start < call:
        opening, closing = said[:start], said[start + len(text):call]
    return CallSyntax(prefix, middle, separator, tail, opening, closing)


def read_calls(text: str, syntax: CallSyntax) -> tuple[str, list[dict]] | None:
    """(the text beside the calls, [{"name", "arguments"}]), or None where `text` holds no well-formed call. They
    are read from the first occurrence of the prefix that starts well-formed calls (it may occur in text before)."""
    prefix = syntax.prefix.strip()
    start = text.find(prefix) if prefix else -1
    while start >= 0:
        found = calls_from(text, start + len(prefix), syntax)
        if found is not None:
            calls, after = found
            before = text[:start].strip()
            opening, closing = syntax.content_open.strip(), syntax.content_close.strip()
            if opening and before.startswith(opening):
                before = before[len(opening):].lstrip()
            if closing and before.endswith(closing):
                before = before[:-len(closing)].rstrip()
            return "\n".join(part for part in (before, after) if part), calls
        start = text.find(prefix, start + 1)
    return None


def calls_from(text: str, pos: int, syntax: CallSyntax) -> tuple[list[dict], str] | None:
    """The calls whose first name starts at `pos`, and the text after them that is not the template's."""
    calls, separator = [], (syntax.separator or "").strip()
    while True:
        found = one_call(text, pos, syntax.middle.strip())
        if found is None:
            return None
        call, pos = found
        calls.append(call)
        rest = text[pos:].lstrip()
        if not (separator and rest.startswith(separator)):
            break
        pos = len(text) - len(rest) + len(separator)
    after = leftover(text[pos:], syntax)
    return None if after is None else (calls, after)


def one_call(text: str, pos: int, middle: str) -> tuple[dict, int] | None:
    """The call whose name starts at `pos`, and where it ends."""
    if middle:
        at = text.find(middle, pos)
        if at < 0:
            return None
        name, pos = text[pos:at].strip(), at + len(middle)
    else:
        found = NAME.match(text, pos + len(text[pos:]) - len(text[pos:].lstrip()))
        if not found:
            return None
        name, pos = found.group(), found.end()
    if not NAME.fullmatch(name):
        return None
    pos += len(text[pos:]) - len(text[pos:].lstrip())
    try:
        arguments, pos = DECODER.raw_decode(text, pos)
        if isinstance(arguments, str):  # arguments written as JSON text inside JSON
            arguments = json.loads(arguments)
    except ValueError:
        return None
    return ({"name": name, "arguments": arguments}, pos) if isinstance(arguments, dict) else None


def leftover(rest: str, syntax: CallSyntax) -> str | None:
    """Text after the last call: "" where it is the template's tail (or the start of it: decoding drops the stop
    token); text after the call's closing is the answer's; None where the call is not closed as the template does."""
    rest, tail = rest.strip(), syntax.tail.strip()
    if tail.startswith(rest):
        return ""
    closing = tail
    if syntax.separator is not None:
        closing = os.path.commonprefix([syntax.separator.strip(), tail]).strip()
    if rest.startswith(closing):
        return rest[len(closing):].strip()
    return None
