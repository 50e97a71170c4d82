"""Conversations -> token ids and labels (-100 where no loss), and the types both the cached pipeline and
the streaming path produce."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ftkit.data.chat_format import ChatFormat


@dataclass
class DataStats:
    train_rows: int = 0
    eval_rows: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_no_loss: int = 0
    skipped_bad_rows: int = 0
    test_split_carved: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    max_token_id: int | None = None  # recorded once here, so a cached run need not rescan every id
    rows_per_source: dict[str, int] = field(default_factory=dict)  # after weighting
    rows_in_per_source: dict[str, int] = field(default_factory=dict)  # before weighting
    seed: int = 0  # mixer sampling, shuffling and the carved test split
    cache: str = ""


class Prepared(NamedTuple):
    train: Any  # datasets.Dataset of input_ids/labels
    eval: Any  # the same, or None
    stats: DataStats
    eval_conversations: list  # the eval rows' messages, for before/after samples


def encode_batch(batch: dict[str, list], chat_format: ChatFormat, train_on: str, max_length: int | None,
                 overlong: str) -> dict[str, list]:
    tokenizer, eos_id = chat_format.tokenizer, chat_format.tokenizer.eos_token_id
    chats = [(i, chat_format.assistant_spans(m, train_on)) for i, m in enumerate(batch["messages"]) if m is not None]
    encoded: dict[int, tuple[list[int], list[int]]] = {
        i: (e.input_ids, e.labels) for (i, _), e in zip(chats, chat_format.encode_texts([c for _, c in chats]))
    }
    for i, text in enumerate(batch["text"]):
        if batch["messages"][i] is None:  # plain text: continued pre-training, loss on everything, ends with eos
            ids = tokenizer(text)["input_ids"] + ([eos_id] if eos_id is not None else [])
            encoded[i] = (ids, list(ids))
    out: dict[str, list] = {"input_ids": [], "labels": [], "truncated": [], "keep": [], "n_trained": []}
    for i in range(len(batch["text"])):
        ids, labels = encoded[i]
        too_long = max_length is not None and len(ids) > max_length
        if too_long and overlong == "truncate":
            ids, labels = ids[:max_length], labels[:max_length]
        trained = sum(1 for label in labels if label != -100)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["truncated"].append(too_long)
        out["keep"].append(trained > 0 and not (too_long and overlong == "drop"))
        out["n_trained"].append(trained)
    return out
