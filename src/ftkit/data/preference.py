"""Preference data: rows of chosen/rejected answers (DPO, ORPO, SimPO) or labelled completions (KTO) -> token ids
with exact answer masks, cached like SFT data.

Accepted per source (detected from its columns, so sources of different shapes mix):
- `prompt` / `chosen` / `rejected`, each plain text, or conversational: `prompt` a list of messages and `chosen` /
  `rejected` lists holding one assistant message;
- UltraFeedback-binarized (alignment-handbook): `chosen` and `rejected` full conversations sharing the prompt turns,
  with or without a `prompt` column (the turns before the last answer are the prompt; they must be equal);
- KTO's `prompt` / `completion` / `label` (label true for a desirable completion). A paired source trains KTO as
  two rows, the chosen answer desirable and the rejected one not.

Why ftkit tokenises rather than TRL: the trainers render prompt and prompt+answer through the chat template and
train on every token after their common prefix, so an answer carries loss on the text the template puts after its
end-of-turn token (ChatML's newline) and depends on the template rendering a prefix as a prefix. ftkit renders each
answer through ChatFormat (the SFT masks), so an answer's trained tokens are exactly its text plus the template's
end-of-turn token, and chosen and rejected share the prompt tokens chat will send.
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

from ftkit.data.chat_format import ChatFormat
from ftkit.data.formats import BadRow, check_conversation
from ftkit.data.loading import MixStats, apply_columns, carved_count, column_names, is_eval_split, load_split, take
from ftkit.config.sources import SourceSpec, data_seed, mixture_option, sources_from_recipe
from ftkit.data.tokenize import DataStats, Prepared
from ftkit.errors import FtkitError

PAIRED, UNPAIRED = "paired", "unpaired"


def detect_shape(columns: list[str]) -> str:
    cols = set(columns)
    if {"chosen", "rejected"} <= cols:
        return PAIRED
    if {"prompt", "completion", "label"} <= cols:
        return UNPAIRED
    raise BadRow(f"columns {sorted(cols)} are not preference data: expected prompt/chosen/rejected (or chosen/rejected "
                 "conversations) or KTO's prompt/completion/label; map yours with dataset_mixture `columns: {...}`")


def as_messages(value: Any, what: str) -> list[dict]:
    """A column's value as messages: text is one user turn (prompt) or one assistant turn (answers)."""
    if isinstance(value, str):
        return [{"role": "user" if what == "prompt" else "assistant", "content": value}]
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        raise BadRow(f"'{what}' must be text or a list of {{role, content}} messages, got {type(value).__name__}")
    return [{"role": str(m["role"]), "content": m["content"] if m["content"] is not None else ""} for m in value]


def split_answer(prompt: list[dict] | None, value: Any, what: str) -> tuple[list[dict] | None, dict]:
    """(prompt turns, answer message) of a chosen/rejected/completion value; a full conversation carries its own
    prompt turns (UltraFeedback-binarized)."""
    if value is None or (isinstance(value, (str, list)) and not value):
        raise BadRow(f"missing or empty '{what}'")
    messages = as_messages(value, what)
    if messages[-1]["role"] != "assistant":
        raise BadRow(f"'{what}' does not end with an assistant answer")
    if not str(messages[-1]["content"]).strip():
        raise BadRow(f"'{what}' is an empty answer")
    return (messages[:-1] if len(messages) > 1 else prompt), messages[-1]


def with_system(prompt: list[dict], system: str | None) -> list[dict]:
    if system and (not prompt or prompt[0]["role"] != "system"):
        return [{"role": "system", "content": system}, *prompt]
    return prompt


def normalise_row(row: dict, shape: str, system: str | None) -> dict:
    """One source row -> {"prompt": messages, "chosen": message, "rejected": message} or {"prompt", "completion",
    "label"}; BadRow says what is wrong."""
    prompt = as_messages(row["prompt"], "prompt") if row.get("prompt") not in (None, "", []) else None
    keys = ("chosen", "rejected") if shape == PAIRED else ("completion",)
    parts = {key: split_answer(prompt, row.get(key), key) for key in keys}
    prompts = [p for p, _ in parts.values()]
    if any(p is None for p in prompts):
        raise BadRow("no prompt: give a 'prompt' column, or chosen/rejected conversations with the user turns")
    if any(p != prompts[0] for p in prompts[1:]):
        raise BadRow("the prompt turns of 'chosen' and 'rejected' differ; a pair answers one prompt")
    out = {"prompt": with_system(prompts[0], system), **{key: answer for key, (_, answer) in parts.items()}}
    check_conversation(out["prompt"] + [out[keys[0]]])
    if shape == PAIRED and out["chosen"]["content"] == out["rejected"]["content"]:
        raise BadRow("'chosen' and 'rejected' are the same answer; nothing to prefer")
    if shape == UNPAIRED:
        if not isinstance(row.get("label"), bool):
            raise BadRow(f"'label' must be true (desirable) or false (undesirable), got {row.get('label')!r}")
        out["label"] = row["label"]
    return out


def normalise_source(rows: list[dict], spec: SourceSpec, method: str, system: str | None, on_bad_rows: str,
                     stats: MixStats) -> list[dict]:
    try:
        shape = detect_shape(column_names(rows))
    except BadRow as err:
        raise FtkitError(f"source '{spec.path}': {err}") from None
    if shape == UNPAIRED and method != "kto":
        raise FtkitError(f"source '{spec.path}': prompt/completion/label rows are KTO's unpaired form; {method} needs "
                         "chosen/rejected pairs (set method: kto)")
    out = []
    for number, row in enumerate(rows, 1):
        try:
            item = normalise_row(row, shape, spec.system_prompt or system)
        except BadRow as err:
            if on_bad_rows == "error":
                raise FtkitError(f"source '{spec.path}', row {number}: {err} (set on_bad_rows: skip to skip such "
                                 "rows)") from None
            stats.skipped += 1
            continue
        out += unpaired(item) if method == "kto" and shape == PAIRED else [item]
    return out


def unpaired(item: dict) -> list[dict]:
    """A pair as two KTO rows: the chosen answer desirable, the rejected one not."""
    return [{"prompt": item["prompt"], "completion": item["chosen"], "label": True},
            {"prompt": item["prompt"], "completion": item["rejected"], "label": False}]


def load_preference_mixture(specs: list[SourceSpec], recipe, seed: int) -> tuple[list, list, MixStats]:
    """Every source -> (train rows, eval rows, stats), mixed and split as SFT's data is (loading.load_mixture, whose
    loop normalises rows to conversations, which preference rows are not)."""
    d, stats, train, evaluation = recipe.data, MixStats(), [], []
    for spec in specs:
        for split in spec.splits:
            found = load_split(spec, split)
            if found is None:
                continue
            rows = normalise_source(apply_columns(found, spec), spec, recipe.method, d.system_prompt, d.on_bad_rows,
                                    stats)
            name = f"{spec.path}[{split}]"
            stats.rows_in[name] = len(rows)
            chosen = rows if is_eval_split(split) else take(rows, spec.weight, seed)
            stats.rows_used[name] = len(chosen)
            (evaluation if is_eval_split(split) else train).extend(chosen)
    if not train:
        raise FtkitError("no training rows: every source was empty, had no train split, or every row was skipped")
    random.Random(seed).shuffle(train)
    size = d.test_split_size or mixture_option(d, "test_split_size")
    if not evaluation and size:
        count = carved_count(size, len(train))
        evaluation, train = train[:count], train[count:]
        stats.test_split_carved = count
    return train, evaluation, stats


# ---------------------------------------------------------------------------------------------------- tokenising

def answer_ids(chat_format: ChatFormat, prompt: list[dict], answers: list[dict]) -> tuple[list[list[int]], list]:
    """Each answer rendered after the prompt with ftkit's SFT masks -> (prompt ids of each rendering, the answer's
    trained ids: its text and the end-of-turn token, nothing after)."""
    items = [chat_format.samples(prompt + [answer], "last_assistant")[0] for answer in answers]
    prompts, trained = [], []
    for enc in chat_format.encode_texts(items):
        marked = [i for i, label in enumerate(enc.labels) if label != -100]
        first, last = (marked[0], marked[-1] + 1) if marked else (len(enc.input_ids), len(enc.input_ids))
        prompts.append(enc.input_ids[:first])
        trained.append(enc.input_ids[first:last])
    return prompts, trained


def common_prefix(sequences: list[list[int]]) -> int:
    length = min(len(s) for s in sequences)
    for i in range(length):
        if any(s[i] != sequences[0][i] for s in sequences[1:]):
            return i
    return length


def encode_row(item: dict, chat_format: ChatFormat, limits: dict, stats: DataStats) -> dict | None:
    """-> {"prompt_ids", "chosen_ids", "rejected_ids"} or {"prompt_ids", "completion_ids", "label"}; None when the row
    is dropped (too long with overlong: drop, or a prompt that fills max_length)."""
    keys = ("completion",) if "completion" in item else ("chosen", "rejected")
    prompts, answers = answer_ids(chat_format, item["prompt"], [item[k] for k in keys])
    shared = common_prefix(prompts)
    if any(len(p) != shared for p in prompts):  # a token merged across the prompt/answer boundary (rare): as TRL
        answers = [p[shared:] + a for p, a in zip(prompts, answers)]
    prompt = prompts[0][:shared]
    most_prompt, most = limits.get("max_prompt_length"), limits.get("max_length")
    cut = False
    if most_prompt and len(prompt) > most_prompt:
        prompt, cut = prompt[len(prompt) - most_prompt:], True  # keep the end, nearest the answer
    if most and len(prompt) + max(len(a) for a in answers) > most:
        if limits.get("overlong") == "drop" or len(prompt) >= most:
            stats.dropped_overlong += 1
            return None
        answers, cut = [a[: most - len(prompt)] for a in answers], True
    stats.truncated += cut
    stats.tokens += sum(len(prompt) + len(a) for a in answers)
    stats.trained_tokens += sum(len(a) for a in answers)
    top = max(max(prompt, default=-1), *(max(a, default=-1) for a in answers))
    stats.max_token_id = max(top, stats.max_token_id if stats.max_token_id is not None else -1)
    out = {"prompt_ids": prompt, **{f"{k}_ids": a for k, a in zip(keys, answers)}}
    return out | ({"label": item["label"]} if "label" in item else {})


def tokenize(rows: list[dict], chat_format: ChatFormat, limits: dict, stats: DataStats):
    import datasets

    encoded = [e for e in (encode_row(row, chat_format, limits, stats) for row in rows) if e is not None]
    return datasets.Dataset.from_list(encoded) if encoded else None


def preference_cache_key(recipe, chat_format: ChatFormat, seed: int) -> str:
    from ftkit.data.pipeline import cache_key

    extra = [cache_key(recipe, chat_format, seed), "preference", recipe.method, recipe.data.max_prompt_length]
    return hashlib.sha256(json.dumps(extra).encode()).hexdigest()[:16]


def build_preference_datasets(recipe, chat_format: ChatFormat, use_cache: bool = True, log=print) -> Prepared:
    """Recipe -> tokenised preference train/eval sets, cached under the same root as SFT data."""
    from ftkit.data.pipeline import cache_root, reuse_cache, save_cache, stats_from_mix

    seed = data_seed(recipe)
    key = preference_cache_key(recipe, chat_format, seed)
    cached = reuse_cache(key, use_cache, log)
    if cached is not None:
        return cached
    train_rows, eval_rows, mix = load_preference_mixture(sources_from_recipe(recipe.data), recipe, seed)
    stats = stats_from_mix(mix)
    stats.seed, stats.cache = seed, key
    limits = {"max_length": recipe.sft_value("max_length"), "max_prompt_length": recipe.data.max_prompt_length,
              "overlong": recipe.data.overlong}
    train = tokenize(train_rows, chat_format, limits, stats)
    evaluation = tokenize(eval_rows, chat_format, limits, stats)
    if train is None:
        raise FtkitError("no training samples left after tokenising: every sample was dropped (see max_length, "
                         "max_prompt_length, overlong)")
    stats.train_rows, stats.eval_rows = len(train), len(evaluation) if evaluation is not None else 0
    log(f"tokenised {len(train_rows) + len(eval_rows):,} preference rows (cache {key})")
    if use_cache:
        save_cache(cache_root() / key, train, evaluation, stats, eval_rows)
    return Prepared(train, evaluation, stats, eval_rows)
