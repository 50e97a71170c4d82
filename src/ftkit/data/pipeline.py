"""Recipe -> tokenised train/eval datasets with `input_ids` and `labels` (-100 where no loss), cached.

The cache key covers everything that changes the tokens (data file contents, sources and weights,
template text, tokenizer vocabulary and added tokens, max_length, masking, ftkit's version), so a
cached dataset is never stale; change nothing and the second run does no tokenisation at all.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ftkit import __version__
from ftkit.data.chat_format import ChatFormat
from ftkit.data.loading import MixStats, load_mixture, local_files
from ftkit.config.sources import data_seed, mixture_option, sources_from_recipe
from ftkit.data.tokenize import DataStats, Prepared, encode_batch, stored
from ftkit.errors import FtkitError

LAYOUT = 2  # how rows become samples and what the cache holds; a change makes older cache entries unused


def cache_root() -> Path:
    return Path(os.environ.get("FTKIT_CACHE", Path.home() / ".cache" / "ftkit")) / "tokenized"


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([tokenizer.all_special_tokens, sorted(tokenizer.get_added_vocab().items())])
    return hashlib.sha256((text + extra).encode()).hexdigest()


def cache_key(recipe, chat_format: ChatFormat, seed: int) -> str:
    specs = sources_from_recipe(recipe.data)
    sources = []
    for spec in specs:
        files = local_files(spec)
        content = [file_digest(p) for p in files] if files else None
        sources.append({**asdict(spec), "content": content})
    d = recipe.data
    parts: dict[str, Any] = {
        "ftkit": __version__, "layout": LAYOUT, "sources": sources, "system_prompt": d.system_prompt,
        "train_on": d.train_on,
        "on_bad_rows": d.on_bad_rows, "overlong": d.overlong, "test_split_size": test_split_size(recipe),
        "auto_insert_empty_system_msg": d.auto_insert_empty_system_msg, "seed": seed,
        "template": chat_format.template, "chat_template_kwargs": chat_format.template_kwargs,
        "tokenizer": tokenizer_digest(chat_format.tokenizer),
        "max_length": recipe.sft_value("max_length"),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def test_split_size(recipe) -> float | None:
    return recipe.data.test_split_size or mixture_option(recipe.data, "test_split_size")


def tokenize_rows(rows: list[dict], chat_format: ChatFormat, recipe, stats: DataStats, part: str = "train"):
    """Rows -> a dataset of input_ids/labels; `part` ("train" or "eval") says which token counts they add to."""
    import datasets

    if not rows:
        return None
    for row in rows:
        if recipe.data.auto_insert_empty_system_msg and row["messages"] and row["messages"][0]["role"] != "system":
            row["messages"].insert(0, {"role": "system", "content": ""})
    raw = datasets.Dataset.from_list([stored(row) for row in rows])
    encoded = raw.map(
        encode_batch,
        batched=True,
        batch_size=256,
        num_proc=recipe.data.preprocessing_num_workers if len(rows) > 1000 else None,
        remove_columns=raw.column_names,
        fn_kwargs={"chat_format": chat_format, "train_on": recipe.data.train_on,
                   "max_length": recipe.sft_value("max_length"), "overlong": recipe.data.overlong},
        load_from_cache_file=False,
        desc="Tokenising",
    )
    truncated, keep = encoded["truncated"], encoded["keep"]
    stats.truncated += sum(1 for t, k in zip(truncated, keep) if t and k)
    stats.dropped_overlong += sum(1 for t, k in zip(truncated, keep) if t and not k and recipe.data.overlong == "drop")
    stats.dropped_no_loss += sum(1 for t, k in zip(truncated, keep) if not k and not (t and recipe.data.overlong == "drop"))
    kept = encoded.filter(lambda k: k, input_columns="keep", batched=False)
    all_ids = kept["input_ids"]
    tokens, trained = sum(len(ids) for ids in all_ids), sum(kept["n_trained"])
    if part == "train":
        stats.tokens, stats.trained_tokens = stats.tokens + tokens, stats.trained_tokens + trained
        stats.conversations += len(rows)
        stats.split_conversations += sum(encoded["split"])
        stats.unrendered_turns += sum(encoded["unrendered"])
    else:
        stats.eval_tokens, stats.eval_trained_tokens = stats.eval_tokens + tokens, stats.eval_trained_tokens + trained
    top = max((max(ids) for ids in all_ids if ids), default=-1)
    stats.max_token_id = max(top, stats.max_token_id if stats.max_token_id is not None else -1)
    return kept.remove_columns(["truncated", "keep", "n_trained", "split", "unrendered"])


def no_samples_left(stats) -> str:
    """Why no training sample is left, from what tokenising dropped."""
    reasons = []
    if stats.dropped_overlong:
        reasons.append(f"{stats.dropped_overlong:,} longer than max_length (raise max_length, or overlong: truncate)")
    if stats.dropped_no_loss:
        reasons.append(f"{stats.dropped_no_loss:,} with no token to train on (only weight-0 turns, train_on leaves "
                       "nothing, or max_length cuts the answer off; `ftkit preview` shows the masks)")
    return "no training samples left after tokenising: " + ("; ".join(reasons) or "the data has no rows")


def build_datasets(recipe, chat_format: ChatFormat, use_cache: bool = True, log=print) -> Prepared:
    if recipe.data.streaming:
        from ftkit.data.streaming import build_streaming

        return build_streaming(recipe, chat_format, log)
    seed = data_seed(recipe)
    key = cache_key(recipe, chat_format, seed)
    cached = reuse_cache(key, use_cache, log)
    if cached is not None:
        return cached

    specs = sources_from_recipe(recipe.data)
    train_rows, eval_rows, mix = load_mixture(specs, recipe.data.system_prompt, recipe.data.on_bad_rows, seed,
                                              test_split_size(recipe))
    stats = stats_from_mix(mix)
    stats.seed = seed
    train = tokenize_rows(train_rows, chat_format, recipe, stats)
    evaluation = tokenize_rows(eval_rows, chat_format, recipe, stats, "eval")
    stats.train_rows, stats.eval_rows = len(train), len(evaluation) if evaluation is not None else 0
    stats.cache = key
    if stats.train_rows == 0:
        raise FtkitError(no_samples_left(stats))
    log(f"tokenised {len(train_rows) + len(eval_rows):,} conversations (cache {key})")
    conversations = [{k: row[k] for k in ("messages", "tools", "chat_template_kwargs")} for row in eval_rows
                     if row["messages"]]
    if use_cache:
        save_cache(cache_root() / key, train, evaluation, stats, conversations)
    return Prepared(train, evaluation, stats, conversations)


def reuse_cache(key: str, use_cache: bool, log=print) -> Prepared | None:
    """The tokens cached under `key`, saying so, or None."""
    folder = cache_root() / key
    cached = load_cache(folder) if use_cache else None
    if cached is not None:
        log(f"reused cached tokens {key} ({cached.stats.train_rows} train, {cached.stats.eval_rows} eval rows; {folder})")
    return cached


def load_cache(folder: Path) -> Prepared | None:
    """A complete cache entry, or None (missing, or written by an older layout: then it is rebuilt)."""
    import datasets

    try:
        stats = DataStats(**json.loads((folder / "stats.json").read_text()))
        conversations = json.loads((folder / "eval_conversations.json").read_text(encoding="utf-8"))
        train = datasets.load_from_disk(str(folder / "train"))
        evaluation = datasets.load_from_disk(str(folder / "eval")) if (folder / "eval").is_dir() else None
    except (OSError, ValueError, TypeError):
        return None
    return Prepared(train, evaluation, stats, conversations)


def stats_from_mix(mix: MixStats) -> DataStats:
    return DataStats(skipped_bad_rows=mix.skipped, test_split_carved=mix.test_split_carved,
                     rows_per_source=dict(mix.rows_used), rows_in_per_source=dict(mix.rows_in))


def save_cache(folder: Path, train, evaluation, stats: DataStats, conversations: list) -> None:
    """Write to a temporary folder and rename, so an interrupted run never leaves a half cache."""
    import shutil

    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    train.save_to_disk(str(tmp / "train"))
    if evaluation is not None:
        evaluation.save_to_disk(str(tmp / "eval"))
    (tmp / "eval_conversations.json").write_text(json.dumps(conversations, ensure_ascii=False), encoding="utf-8")
    (tmp / "stats.json").write_text(json.dumps(asdict(stats)))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
