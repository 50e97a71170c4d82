"""Conversations -> token ids and labels (-100 where no loss), and the types both the cached pipeline and
the streaming path produce."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ftkit.data.chat_format import ChatFormat
from ftkit.errors import FtkitError


@dataclass
class DataStats:
    train_rows: int = 0  # samples
    eval_rows: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_no_loss: int = 0
    skipped_bad_rows: int = 0
    test_split_carved: int = 0
    tokens: int = 0  # training samples only; the eval split's are counted apart
    trained_tokens: int = 0
    eval_tokens: int = 0
    eval_trained_tokens: int = 0
    conversations: int = 0  # training conversations (and text rows)
    split_conversations: int = 0  # trained as one sample per assistant turn (the template rewrites earlier turns)
    unrendered_turns: int = 0  # trained assistant turns whose text or reasoning the template leaves out
    max_token_id: int | None = None  # recorded once here, so a cached run need not rescan every id
    rows_per_source: dict[str, int] = field(default_factory=dict)  # after weighting
    rows_in_per_source: dict[str, int] = field(default_factory=dict)  # before weighting
    seed: int = 0  # mixer sampling, shuffling and the carved test split
    cache: str = ""


class Prepared(NamedTuple):
    train: Any  # datasets.Dataset of input_ids/labels
    eval: Any  # the same, or None
    stats: DataStats
    eval_conversations: list  # the eval rows (messages, tools, chat_template_kwargs), for before/after samples


def stored(row: dict) -> dict:
    """A row as one JSON text column: Arrow would give every message the union of all messages' keys (a `tool_calls:
    None` on every turn, null-filled keys inside tool-call arguments), which changes what templates render."""
    return {"row": json.dumps(row, ensure_ascii=False)}


def row_samples(row: dict, chat_format: ChatFormat, train_on: str, unrendered: list) -> list[tuple[str, list]]:
    try:
        return chat_format.samples(row["messages"], train_on, row.get("tools"), row.get("chat_template_kwargs"),
                                   unrendered=unrendered)
    except FtkitError as err:
        raise FtkitError(f"{row['where']}: {err}" if row.get("where") else str(err)) from None


def encode_batch(batch: dict[str, list], chat_format: ChatFormat, train_on: str, max_length: int | None,
                 overlong: str) -> dict[str, list]:
    """Stored rows -> samples; a conversation the template rewrites gives several (see ChatFormat.samples)."""
    tokenizer, eos_id = chat_format.tokenizer, chat_format.tokenizer.eos_token_id
    encoded: list[tuple[list[int], list[int], bool, int]] = []  # ids, labels, first of a split row, unrendered
    chats: list[tuple[int, int, int]] = []  # (position in `encoded`, samples, unrendered turns)
    texts = []
    for raw in batch["row"]:
        row = json.loads(raw)
        if row["messages"] is None:  # plain text: continued pre-training, loss on everything, ends with eos
            ids = tokenizer(row["text"])["input_ids"] + ([eos_id] if eos_id is not None else [])
            encoded.append((ids, list(ids), False, 0))
            continue
        unrendered: list[int] = []
        samples = row_samples(row, chat_format, train_on, unrendered)
        chats.append((len(encoded), len(samples), len(unrendered)))
        encoded += [([], [], False, 0)] * len(samples)
        texts += samples
    pieces = iter(chat_format.encode_texts(texts))
    for start, count, lost in chats:
        for k in range(count):
            piece = next(pieces)
            encoded[start + k] = (piece.input_ids, piece.labels, k == 0 and count > 1, lost if k == 0 else 0)
    out: dict[str, list] = {"input_ids": [], "labels": [], "truncated": [], "keep": [], "n_trained": [], "split": [],
                            "unrendered": []}
    for ids, labels, split, lost in encoded:
        too_long = max_length is not None and len(ids) > max_length
        if too_long and overlong == "truncate":
            ids, labels = ids[:max_length], labels[:max_length]
        trained = sum(1 for label in labels if label != -100)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["truncated"].append(too_long)
        out["keep"].append(trained > 0 and not (too_long and overlong == "drop"))
        out["n_trained"].append(trained)
        out["split"].append(split)
        out["unrendered"].append(lost)
    return out
