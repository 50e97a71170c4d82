"""`streaming: true`: train on data larger than RAM. Rows are read, normalised and tokenised lazily
as training consumes them, so nothing is cached and counts are not known in advance (max_steps is
required). Weights <= 1 become sampling probabilities of the interleaved sources; a weight > 1 caps a
source at that many rows. An eval split, when asked for, is the first `test_split_size` rows.
"""

from __future__ import annotations

from ftkit.data.chat_format import ChatFormat
from ftkit.data.formats import BadRow, detect_format, to_internal
from ftkit.data.loading import BUILDERS, check_not_empty, is_eval_split, local_files
from ftkit.config.sources import SourceSpec, data_seed, sources_from_recipe
from ftkit.data.tokenize import DataStats, Prepared, encode_batch, stored
from ftkit.errors import FtkitError

SHUFFLE_BUFFER = 10_000


def stream_split(spec: SourceSpec, split: str):
    import datasets

    files = local_files(spec)
    if files is not None:
        for path in files:
            check_not_empty(path)
        builder = BUILDERS[files[0].suffix.lower()]
        kwargs = {"delimiter": "\t"} if files[0].suffix.lower() == ".tsv" else {}
        return datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train", streaming=True,
                                     **kwargs)
    return datasets.load_dataset(spec.path, spec.config, split=split, streaming=True, revision=spec.revision)


def normalised(stream, spec: SourceSpec, system_prompt: str | None, on_bad_rows: str):
    first = next(iter(stream))
    if isinstance(spec.columns, dict):
        stream, first = stream.rename_columns(spec.columns), {spec.columns.get(k, k): v for k, v in first.items()}
    try:
        fmt = spec.format or detect_format(list(first))
    except BadRow as err:
        raise FtkitError(f"source '{spec.path}': {err}") from None

    def convert(row: dict) -> dict:
        try:
            internal = to_internal(row, fmt, spec.system_prompt or system_prompt, spec.tools)
            return {**stored({**internal, "where": f"source '{spec.path}'"}), "bad": False}
        except BadRow as err:
            if on_bad_rows == "error":
                raise FtkitError(f"source '{spec.path}': {err} (set on_bad_rows: skip to skip such rows)") from None
            return {"row": "", "bad": True}

    stream = stream.map(convert, remove_columns=list(first))
    return stream.filter(lambda row: not row["bad"]).remove_columns(["bad"])


def build_streaming(recipe, chat_format: ChatFormat, log=print):
    import datasets

    d = recipe.data
    seed = data_seed(recipe)
    streams, weights, wants_eval = [], [], False
    for spec in sources_from_recipe(d):
        for split in spec.splits:
            if is_eval_split(split):
                wants_eval = True
                continue
            stream = normalised(stream_split(spec, split), spec, d.system_prompt, d.on_bad_rows)
            streams.append(stream.take(int(spec.weight)) if spec.weight > 1 else stream)
            weights.append(spec.weight if spec.weight <= 1 else 1.0)
    total = sum(weights)
    mixed = streams[0] if len(streams) == 1 else datasets.interleave_datasets(
        streams, probabilities=[w / total for w in weights], seed=seed, stopping_strategy="all_exhausted")
    tokenised = mixed.map(encode_batch, batched=True, batch_size=256, remove_columns=["row"],
                          fn_kwargs={"chat_format": chat_format, "train_on": d.train_on,
                                     "max_length": recipe.sft_value("max_length"), "overlong": d.overlong})
    tokenised = tokenised.filter(lambda keep: keep, input_columns="keep").remove_columns(
        ["truncated", "keep", "n_trained", "split", "unrendered"])
    evaluation, count = None, int(d.test_split_size or 0)
    if wants_eval and count >= 1:
        evaluation, tokenised = tokenised.take(count), tokenised.skip(count)
    # The Trainer treats an iterable dataset as one epoch of max_steps; running dry mid-way wastes steps and
    # batches. So the stream never ends: shuffled through a buffer and repeated, max_steps sets the length.
    tokenised = tokenised.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER).repeat(None)
    log("streaming: rows are read and tokenised as training goes; no cache, counts unknown in advance")
    return Prepared(tokenised, evaluation, DataStats(seed=seed, cache="streaming"), [])
