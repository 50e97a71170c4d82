"""Generation options: one definition for chat, predict, serve and the REPL's /set."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from ftkit.errors import FtkitError


@dataclass
class GenerationOptions:
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    greedy: bool = False
    seed: int | None = None
    min_new_tokens: int = 0  # end-of-turn and eos are suppressed until this many tokens

    def set(self, assignment: str) -> None:
        """`/set temperature=0.5`: one field, parsed to its type; raises FtkitError on a bad name or value."""
        name, sep, raw = assignment.partition("=")
        name, raw = name.strip().replace("-", "_"), raw.strip()
        kinds = {f.name: f.type for f in fields(self)}
        if not sep or name not in kinds:
            raise FtkitError(f"usage: /set NAME=VALUE with NAME one of {', '.join(kinds)}")
        kind = kinds[name]
        try:
            if raw.lower() in ("none", "null", "") and "None" in str(kind):
                value = None
            elif "bool" in str(kind):
                if raw.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ValueError(raw)
                value = raw.lower() in ("true", "1", "yes", "on")
            elif "int" in str(kind):
                value = int(raw)
            else:
                value = float(raw)
        except ValueError:
            raise FtkitError(f"{name}: '{raw}' is not a valid {str(kind).split(' ')[0]}") from None
        previous = getattr(self, name)
        setattr(self, name, value)
        try:
            self.check()
        except FtkitError:
            setattr(self, name, previous)  # a refused value leaves the old one in force
            raise

    def check(self) -> None:
        numbers = {"temperature": self.temperature, "top_p": self.top_p, "repetition_penalty": self.repetition_penalty}
        for key, value in numbers.items():
            if not math.isfinite(value):
                raise FtkitError(f"{key} must be a finite number, got {value}")
        if self.max_new_tokens < 1:
            raise FtkitError("max_new_tokens must be at least 1")
        if self.min_new_tokens < 0:
            raise FtkitError("min_new_tokens must be 0 or more")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.repetition_penalty <= 0 \
                or self.no_repeat_ngram_size < 0:
            raise FtkitError("need temperature >= 0, 0 < top_p <= 1, top_k >= 0, repetition_penalty > 0, "
                             "no_repeat_ngram_size >= 0")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            raise FtkitError(f"seed must be in [0, 2**32), got {self.seed}")

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in asdict(self).items())
