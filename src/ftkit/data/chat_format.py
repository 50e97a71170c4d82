"""How a chat template lays out a conversation, found by rendering probes; shared by training and chat.

Why our own code: TRL's `assistant_only_loss` needs `{% generation %}` markers that most templates
lack. We find each assistant turn by rendering conversation prefixes instead, which works for any
template whose rendering of a prefix is a prefix of the rendering of the whole (all common ones).
The same object builds inference prompts, so training and chat can never disagree on the format.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

from ftkit.errors import FtkitError

PROBE_Q, PROBE_A, PROBE_S = "ftkitprobequestion", "ftkitprobeanswer", "ftkitprobesystem"
SPECIAL_LOOKING = re.compile(r"<\|[^|<>\s]+\|>|<[a-z_]+>|</s>")


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


class ChatFormat:
    def __init__(self, tokenizer, template: str):
        self.tokenizer, self.template = tokenizer, template
        self.supports_system = self._renders([{"role": "system", "content": PROBE_S}, {"role": "user", "content": PROBE_Q}])
        user = [{"role": "user", "content": PROBE_Q}]
        try:
            full = self.render(user + [{"role": "assistant", "content": PROBE_A}])
            before = self.render(user)
        except Exception as err:  # jinja syntax errors, undefined variables, raise_exception(...)
            raise FtkitError(f"the chat template cannot render a user/assistant exchange: {type(err).__name__}: "
                             f"{err}") from None
        if not full.startswith(before) or PROBE_A not in full[len(before):]:
            raise FtkitError("the chat template does not render a conversation as prompt followed by answer; "
                             "choose another chat_template (chatml, llama3, gemma, llama2, alpaca)")
        turn = full[len(before):]
        self.header, tail = turn.split(PROBE_A, 1)
        self.has_generation_prompt = self.render(user, add_generation_prompt=True) != before
        self.end_of_turn = self._end_of_turn(tail)
        # Text after the end-of-turn token (e.g. ChatML's "\n") belongs to no one and carries no loss.
        self.after_end = tail[tail.index(self.end_of_turn) + len(self.end_of_turn):] if self.end_of_turn else ""

    def _renders(self, messages: list[dict]) -> bool:
        try:
            self.render(messages, fold=False)
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

    def render(self, messages: list[dict], add_generation_prompt: bool = False, fold: bool = True,
               tools: list[dict] | None = None) -> str:
        # A template may name bos_token/eos_token that this tokenizer lacks: render them as "".
        specials = {name: getattr(self.tokenizer, name, None) or "" for name in ("bos_token", "eos_token")}
        return self.tokenizer.apply_chat_template(
            self.fold_system(messages) if fold else messages,
            chat_template=self.template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            **specials,
        )

    def prompt(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        """The text a model continues to answer `messages`: exactly what training put before an answer.

        Trailing spaces stay with the answer (Llama-2's "[/INST] answer"): tokenizers merge a space into
        the next word, so a prompt ending in one would tokenise differently from training. `tools` (OpenAI
        function schemas) go to the template, which decides whether and how the model sees them.
        """
        text = self.render(messages, add_generation_prompt=True, tools=tools) if self.has_generation_prompt else (
            self.render(messages, tools=tools) + self.header)
        return text.rstrip(" ")

    def missing_tokens(self) -> list[str]:
        """Special-looking strings the template emits that the tokenizer does not have as one token."""
        probe = [{"role": "system", "content": PROBE_S}, {"role": "user", "content": PROBE_Q},
                 {"role": "assistant", "content": PROBE_A}]
        text = self.render(probe) + self.prompt(probe[:2])
        vocab = self.tokenizer.get_vocab()
        return sorted({tok for tok in SPECIAL_LOOKING.findall(text) if tok not in vocab})

    def stop_strings(self) -> list[str]:
        stops = [self.end_of_turn] if self.end_of_turn else []
        eos = self.tokenizer.eos_token
        return stops + ([eos] if eos and eos not in stops else [])

    def assistant_spans(self, messages: list[dict], train_on: str) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans that carry loss."""
        messages = self.fold_system(messages)
        text = self.render(messages)
        if train_on == "all":
            return text, [(0, len(text))]
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start, upto = len(self.prompt(messages[:i])), self.render(messages[: i + 1])
            if not text.startswith(upto) or start > len(upto):
                raise FtkitError("the chat template renders a conversation prefix differently from the whole "
                                 "conversation, so assistant turns cannot be located; use another chat_template "
                                 "or train_on: all")
            end = len(upto) - len(self.after_end) if self.after_end and upto.endswith(self.after_end) else len(upto)
            spans.append((start, end))
        return text, spans[-1:] if train_on == "last_assistant" else spans

    def encode(self, messages: list[dict], train_on: str = "assistant") -> Encoded:
        text, spans = self.assistant_spans(messages, train_on)
        return self.encode_text(text, spans)

    def encode_text(self, text: str, spans: list[tuple[int, int]]) -> Encoded:
        return self.encode_texts([(text, spans)])[0]

    def encode_texts(self, items: list[tuple[str, list[tuple[int, int]]]]) -> list[Encoded]:
        """Tokenise many rendered conversations in one batched call; label tokens that start in a span."""
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
