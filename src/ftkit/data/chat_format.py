"""How a chat template lays out a conversation, found by rendering probes; shared by training and chat.

Why our own code: TRL's `assistant_only_loss` needs `{% generation %}` markers that most templates lack. We find
each assistant turn by rendering the conversation up to it: the text the template gives when that turn is the one
being generated (after the generation prompt) is what the model must learn to produce. Most templates render a
prefix of a conversation as a prefix of the whole, so one sample carries every turn. Some rewrite earlier turns
(Qwen3 drops the <think> block of assistant turns once later messages follow): a turn whose own rendering is not
a prefix of the whole is trained in a sample of its own, ending with that turn, exactly as it is generated.
The same object builds inference prompts, so training and chat can never disagree on the format.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from functools import cached_property

from ftkit.data import template_features
from ftkit.data.call_syntax import CallSyntax
from ftkit.data.template_features import Features
from ftkit.errors import FtkitError

PROBE_Q, PROBE_A, PROBE_S = "ftkitprobequestion", "ftkitprobeanswer", "ftkitprobesystem"
SPECIAL_LOOKING = re.compile(r"<\|[^|<>\s]+\|>|</?[a-z_]+>")


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


Sample = tuple[str, list[tuple[int, int]]]  # rendered text, character spans that carry loss


class TemplateFailed(FtkitError):
    """The template raised (its own raise_exception, or a Jinja error) on a conversation; `cause` says what."""

    def __init__(self, name: str, err: Exception):
        self.cause = f"{type(err).__name__}: {err}"
        super().__init__(f"{name} cannot render this conversation: {self.cause}")


class ChatFormat:
    def __init__(self, tokenizer, template: str, template_kwargs: dict | None = None,
                 name: str = "the chat template"):
        self.tokenizer, self.template, self.name = tokenizer, template, name
        self.template_kwargs = dict(template_kwargs or {})  # every rendering's; a row's own add to these
        self.supports_system = self._renders([{"role": "system", "content": PROBE_S}, {"role": "user", "content": PROBE_Q}])
        user = [{"role": "user", "content": PROBE_Q}]
        try:
            full = self.render(user + [{"role": "assistant", "content": PROBE_A}])
            before = self.render(user)
        except TemplateFailed as err:  # jinja syntax errors, undefined variables, raise_exception(...)
            raise FtkitError(f"{self.name} cannot render a user/assistant exchange: {err.cause}") from None
        if not full.startswith(before) or PROBE_A not in full[len(before):]:
            raise FtkitError(f"{self.name} does not render a conversation as prompt followed by answer; "
                             "choose another chat_template (chatml, llama3, gemma, llama2, alpaca)")
        turn = full[len(before):]
        self.header, tail = turn.split(PROBE_A, 1)
        self.has_generation_prompt = self.render(user, add_generation_prompt=True) != before
        self.end_of_turn = self._end_of_turn(tail)
        # Text after the end-of-turn token (e.g. ChatML's "\n") belongs to no one and carries no loss.
        self.after_end = tail[tail.index(self.end_of_turn) + len(self.end_of_turn):] if self.end_of_turn else ""

    @cached_property
    def features(self) -> Features:
        """What the template does with tool calls, tool results, tool schemas and reasoning."""
        return template_features.detect(self._render)

    @cached_property
    def tool_call_style(self) -> str | CallSyntax | None:
        """How to read tool calls back from a generated answer (inference/replies.py): features.tool_call_style, or
        the template's own syntax as decoded text shows it (tokens that decoding skips removed)."""
        features = self.features
        if features.call_syntax is None:
            return features.tool_call_style
        hidden = {t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special}
        return features.call_syntax.without(hidden | set(self.tokenizer.all_special_tokens))

    def _renders(self, messages: list[dict]) -> bool:
        try:
            self._render(messages)
            return True
        except Exception:  # templates signal "no system role" with raise_exception
            return False

    def _end_of_turn(self, tail: str) -> str | None:
        """The first special token after an answer: <|im_end|>, <|eot_id|>, <end_of_turn>, </s>, ..."""
        specials = set(self.tokenizer.all_special_tokens) | set(self.tokenizer.get_added_vocab())
        found = [(tail.find(tok), tok) for tok in specials if tok and tok in tail]
        return min(found)[1] if found else None

    def fold_system(self, messages: list[dict]) -> list[dict]:
        """Templates without a system role (Gemma) get the system text prepended to the first user turn."""
        if self.supports_system or not messages or messages[0]["role"] != "system":
            return messages
        system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
        if rest and rest[0]["role"] == "user":
            rest[0]["content"] = f"{system}\n\n{rest[0]['content']}"
        return rest

    def _render(self, messages: list[dict], add_generation_prompt: bool = False, tools: list | None = None,
                kwargs: dict | None = None) -> str:
        """The template applied to messages already in its form (see render)."""
        # A template may name bos_token/eos_token that this tokenizer lacks: render them as "".
        specials = {name: getattr(self.tokenizer, name, None) or "" for name in ("bos_token", "eos_token")}
        try:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt,
                tools=tools, **specials, **{**self.template_kwargs, **(kwargs or {})})
        except Exception as err:  # raise_exception("...") in the template, undefined variables, type errors
            raise TemplateFailed(self.name, err) from None

    def adapt(self, messages: list[dict]) -> list[dict]:
        """ftkit's message form -> this template's (argument form, reasoning field, system folding)."""
        if any(m.get("tool_calls") or m.get("reasoning_content") is not None or m.get("weight") == 0
               or (m["role"] == "assistant" and "<think>" in m["content"]) for m in messages):
            messages = template_features.for_template(messages, self.features)
        return self.fold_system(messages)

    def render(self, messages: list[dict], add_generation_prompt: bool = False, tools: list | None = None,
               kwargs: dict | None = None) -> str:
        """`messages` in ftkit's form (data/messages.py); `kwargs`: a row's own chat_template_kwargs."""
        return self._render(self.adapt(messages), add_generation_prompt, tools, kwargs)

    def prompt(self, messages: list[dict], tools: list[dict] | None = None, kwargs: dict | None = None) -> str:
        """The text a model continues to answer `messages`: exactly what training put before an answer.

        Trailing spaces stay with the answer (Llama-2's "[/INST] answer"): tokenizers merge a space into
        the next word, so a prompt ending in one would tokenise differently from training. `tools` (OpenAI
        function schemas) go to the template, which decides whether and how the model sees them.
        """
        return self._prompt(self.adapt(messages), tools, kwargs)

    def _prompt(self, adapted: list[dict], tools: list | None, kwargs: dict | None) -> str:
        if self.has_generation_prompt:
            text = self._render(adapted, True, tools, kwargs)
        else:
            text = self._render(adapted, False, tools, kwargs) + self.header
        return text.rstrip(" ")

    def check_supported(self, messages: list[dict], tools: list | None = None) -> None:
        """Refuse a conversation with parts this template would silently drop (tool calls, tool results, tools)."""
        if any(m.get("tool_calls") or m["role"] == "tool" for m in messages) or tools:
            problem = template_features.unsupported(messages, tools, self.features)
            if problem:
                raise FtkitError(f"{self.name} {problem}; use the model's own chat template or one that renders "
                                 "them (e.g. TRL's qwen3, qwen2_5 or llama3_1 templates)")

    def missing_tokens(self) -> tuple[list[str], list[str]]:
        """Special-looking strings the template emits that the tokenizer lacks as one token, as (special, plain).

        Those inside an answer before its end of turn (<think>, <tool_call>) are words the model writes: they are
        added as plain tokens, so decoding with skip_special_tokens keeps them (as Qwen's own tokenizers do)."""
        probe = [{"role": "system", "content": PROBE_S}, {"role": "user", "content": PROBE_Q},
                 {"role": "assistant", "content": PROBE_A}]
        conversations = [probe]
        if self.features.reasoning:
            conversations.append([*probe[1:2], {**probe[2], "reasoning_content": PROBE_Q}])
        if self.features.arguments:
            call = template_features.probe_call(template_features.PROBE_ARGS)
            result = {"role": "tool", "tool_call_id": "call_0", "name": template_features.PROBE_TOOL, "content": PROBE_S}
            conversations.append(call + ([result] if self.features.tool_results else []))
        vocab, special, plain = self.tokenizer.get_vocab(), set(), set()
        for messages in conversations:
            try:
                samples = self.samples(messages, "assistant", check=False)
                special |= set(SPECIAL_LOOKING.findall(self.render(messages)))
            except Exception:  # a template that cannot be aligned: its tokens are all structure
                samples = [(self.render(messages), [])] if messages is probe else []
            for text, spans in samples:
                inside = set()
                for start, end in spans:
                    answer = text[start:end].rstrip()
                    inside |= {m.group() for m in SPECIAL_LOOKING.finditer(answer) if m.end() < len(answer)}
                plain |= inside
                special |= set(SPECIAL_LOOKING.findall(text)) - inside
            special |= set(SPECIAL_LOOKING.findall(self.prompt(probe[:2])))
        special -= plain
        return sorted(t for t in special if t not in vocab), sorted(t for t in plain if t not in vocab)

    @cached_property
    def call_end(self) -> str | None:
        """The token that ends a tool-call turn, where it is not the end-of-turn token (gpt-oss's <|call|>)."""
        if not self.features.arguments:
            return None
        call = template_features.probe_call(template_features.PROBE_ARGS)
        try:
            [(text, [(start, end)])] = self.samples(call, "assistant", check=False)
        except (FtkitError, ValueError):
            return None
        answer = text[start:end].rstrip()
        found = sorted((tok for tok in self.tokenizer.all_special_tokens if tok and answer.endswith(tok)), key=len)
        return found[-1] if found and found[-1] != self.end_of_turn else None

    def stop_strings(self) -> list[str]:
        """Where generation ends: the end-of-turn token, the end of a tool call if different, eos."""
        stops = [t for t in (self.end_of_turn, self.call_end, self.tokenizer.eos_token) if t]
        return list(dict.fromkeys(stops))

    def samples(self, messages: list[dict], train_on: str, tools: list | None = None, kwargs: dict | None = None,
                check: bool = True, unrendered: list | None = None) -> list[Sample]:
        """The rendered samples of one conversation and the character spans that carry loss: one sample, or one
        per assistant turn where the template renders earlier turns differently once later messages follow.
        `unrendered` collects the numbers of trained turns whose text or reasoning the template leaves out (Llama-3.1
        renders only the call of a turn that has text beside a tool call)."""
        if check:
            self.check_supported(messages, tools)
        trained = {i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("weight") != 0}
        adapted = self.adapt(messages)
        shift = len(messages) - len(adapted)  # a system turn folded into the first user turn
        text = self._render(adapted, False, tools, kwargs)
        if train_on == "all":
            return [(text, [(0, len(text))])]
        turns = [i - shift for i in sorted(trained)]
        if train_on == "last_assistant":
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant") - shift
            turns = [last] if last + shift in trained else []
        groups: list[Sample] = [(text, [])]
        for i in reversed(turns):
            upto, span = self._turn(adapted, i, i + 1 + shift, tools, kwargs)
            said = upto[span[0]:span[1]]
            if unrendered is not None and any(part.strip() not in said for part in (
                    adapted[i]["content"], adapted[i].get("reasoning_content") or "")):
                unrendered.append(i + 1 + shift)
            group = next((g for g in groups if g[0].startswith(upto)), None)
            if group is None:
                group = (upto, [])
                groups.append(group)
            group[1].insert(0, span)
        return [(t, spans) for t, spans in reversed(groups) if spans] or [(text, [])]

    def _turn(self, adapted: list[dict], i: int, number: int, tools, kwargs) -> tuple[str, tuple[int, int]]:
        """Assistant turn i rendered as the turn being generated, and its answer's span in that rendering."""
        prompt = self._prompt(adapted[:i], tools, kwargs)
        upto = self._render(adapted[: i + 1], False, tools, kwargs)
        if not upto.startswith(prompt):
            at = next((k for k, (a, b) in enumerate(zip(prompt, upto)) if a != b), min(len(prompt), len(upto)))
            raise FtkitError(
                f"{self.name} renders assistant turn {number} differently from the prompt it gives for generating "
                f"it (the prompt continues {prompt[at:at + 30]!r}, the turn {upto[at:at + 30]!r}), so its answer "
                "cannot be located; fix that turn (e.g. reasoning with enable_thinking: false) or use another "
                "chat_template")
        end = len(upto) - len(self.after_end) if self.after_end and upto.endswith(self.after_end) else len(upto)
        return upto, (len(prompt), max(end, len(prompt)))

    def answer(self, messages: list[dict], tools: list | None = None, kwargs: dict | None = None) -> str:
        """The text the model is trained to write for the last message (an assistant turn), its end-of-turn token
        left out: with reasoning or a tool call that is the template's rendering, not the content alone."""
        adapted = self.adapt(messages)
        upto, (start, end) = self._turn(adapted, len(adapted) - 1, len(messages), tools, kwargs)
        text = upto[start:end]
        for stop in self.stop_strings():
            text = text.removesuffix(stop)
        return text

    def encode(self, messages: list[dict], train_on: str = "assistant", tools: list | None = None,
               kwargs: dict | None = None) -> list[Encoded]:
        return self.encode_texts(self.samples(messages, train_on, tools, kwargs))

    def encode_texts(self, items: list[Sample]) -> list[Encoded]:
        """Tokenise many rendered samples in one batched call; label tokens that start in a span."""
        if not items:
            return []
        if not getattr(self.tokenizer, "is_fast", False):
            return [self._encode_pieces(text, spans) for text, spans in items]
        enc = self.tokenizer([text for text, _ in items], add_special_tokens=False, return_offsets_mapping=True)
        out = []
        for ids, offsets, (_, spans) in zip(enc["input_ids"], enc["offset_mapping"], items):
            starts = [begin for begin, _ in offsets]  # non-decreasing: two binary searches per span
            labels = [-100] * len(ids)
            for s, e in spans:
                first, last = bisect.bisect_left(starts, s), bisect.bisect_left(starts, e)
                labels[first:last] = ids[first:last]
            out.append(Encoded(ids, labels))
        return out

    def _encode_pieces(self, text: str, spans: list[tuple[int, int]]) -> Encoded:
        """Tokenizers without offsets: tokenise masked and trained pieces separately (prompt-side exact)."""
        ids, labels, cursor = [], [], 0
        for start, end in [*spans, (len(text), len(text))]:
            for piece, trained in ((text[cursor:start], False), (text[start:end], True)):
                if piece:
                    piece_ids = self.tokenizer.encode(piece, add_special_tokens=False)
                    ids += piece_ids
                    labels += piece_ids if trained else [-100] * len(piece_ids)
            cursor = end
        return Encoded(ids, labels)
