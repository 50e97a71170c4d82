"""Load every source of the recipe, normalise its rows, and mix them into train and eval sets."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ftkit.data.formats import FORMATS, BadRow, detect_format, to_internal
from ftkit.data.sources import SourceSpec
from ftkit.errors import FtkitError

BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
EVAL_WORDS = ("test", "eval", "valid", "dev")


@dataclass
class MixStats:
    rows_in: dict[str, int] = field(default_factory=dict)  # "source[split]" -> rows available
    rows_used: dict[str, int] = field(default_factory=dict)  # after weighting
    skipped: int = 0
    test_split_carved: int = 0


def is_eval_split(name: str) -> bool:
    return any(word in name.lower() for word in EVAL_WORDS)


def local_files(spec: SourceSpec) -> list[Path] | None:
    path = Path(spec.path).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in BUILDERS)
        if not files:
            raise FtkitError(f"{path}: folder has no data files ({', '.join(BUILDERS)})")
        return files
    return None


def find_bad_json(path: Path) -> str | None:
    """Name the first line that is not valid JSON, which datasets' own error does not."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            json.loads(text)
            return None
        except json.JSONDecodeError as err:
            return f"{path}:{err.lineno}: not valid JSON: {err.msg}"
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as err:
                return f"{path}:{number}: not valid JSON: {err.msg} (column {err.colno})"
    return None


def load_local(files: list[Path]):
    import datasets

    suffixes = {p.suffix.lower() for p in files}
    if len(suffixes) > 1:
        raise FtkitError(f"{files[0].parent}: mixes file types {sorted(suffixes)}; use one type per source")
    suffix = suffixes.pop()
    kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
    try:  # datasets keys its own cache on path, size and mtime: rebuild, or an in-place edit reads stale rows
        return datasets.load_dataset(BUILDERS[suffix], data_files=[str(p) for p in files], split="train",
                                     download_mode="force_redownload", **kwargs)
    except Exception as err:
        for p in files:
            bad = find_bad_json(p) if BUILDERS[suffix] == "json" else None
            if bad:
                raise FtkitError(bad) from None
        raise FtkitError(f"{files[0]}: could not be read as {suffix[1:]}: {str(err).splitlines()[0]}") from None


def load_split(spec: SourceSpec, split: str):
    """One split of one source; a local file has only the 'train' split (None for any other)."""
    files = local_files(spec)
    if files is not None:
        return load_local(files) if not is_eval_split(split) else None
    import datasets

    try:
        return datasets.load_dataset(spec.path, spec.config, split=split, revision=spec.revision)
    except ValueError as err:
        if "split" in str(err).lower() or "Unknown split" in str(err):
            return None
        raise FtkitError(f"dataset '{spec.path}': {str(err).splitlines()[0]}") from None
    except Exception as err:
        from ftkit.hub import load_failure

        raise FtkitError(f"dataset '{spec.path}' could not be loaded: {load_failure(err)}") from None


def apply_columns(ds, spec: SourceSpec):
    if isinstance(spec.columns, dict):
        missing = [c for c in spec.columns if c not in ds.column_names]
        if missing:
            raise FtkitError(f"source '{spec.path}': columns {missing} not found; it has {ds.column_names}")
        return ds.rename_columns(spec.columns)
    if isinstance(spec.columns, list):
        missing = [c for c in spec.columns if c not in ds.column_names]
        if missing:
            raise FtkitError(f"source '{spec.path}': columns {missing} not found; it has {ds.column_names}")
        return ds.select_columns(spec.columns)
    return ds


def normalise(ds, spec: SourceSpec, system_prompt: str | None, on_bad_rows: str, stats: MixStats):
    try:
        fmt = spec.format or detect_format(ds.column_names)
    except BadRow as err:
        raise FtkitError(f"source '{spec.path}': {err}") from None
    if fmt not in FORMATS:
        raise FtkitError(f"source '{spec.path}': format '{fmt}' is not one of {', '.join(FORMATS)}")
    rows, system = [], spec.system_prompt or system_prompt
    for number, row in enumerate(ds.to_list(), 1):  # one bulk Arrow->Python conversion, not a lookup per row
        try:
            rows.append(to_internal(row, fmt, system))
        except BadRow as err:
            if on_bad_rows == "error":
                raise FtkitError(f"source '{spec.path}', row {number}: {err} (set on_bad_rows: skip to skip such rows)") from None
            stats.skipped += 1
    return rows


def take(rows: list, weight: float, seed: int) -> list:
    """weight <= 1: that fraction of the rows; weight > 1: that many rows. Seeded."""
    import random

    count = round(weight * len(rows)) if weight <= 1 else min(int(weight), len(rows))
    if count >= len(rows):
        return rows
    picked = sorted(random.Random(seed).sample(range(len(rows)), count))
    return [rows[i] for i in picked]


def load_mixture(specs: list[SourceSpec], system_prompt: str | None, on_bad_rows: str, seed: int,
                 test_split_size: float | None) -> tuple[list, list, MixStats]:
    """All sources -> (train rows, eval rows, stats), in the internal form."""
    import random

    stats, train, evaluation = MixStats(), [], []
    for spec in specs:
        for split in spec.splits:
            ds = load_split(spec, split)
            if ds is None:
                continue
            rows = normalise(apply_columns(ds, spec), spec, system_prompt, on_bad_rows, stats)
            name = f"{spec.path}[{split}]"
            stats.rows_in[name] = len(rows)
            chosen = take(rows, spec.weight, seed) if not is_eval_split(split) else rows
            stats.rows_used[name] = len(chosen)
            (evaluation if is_eval_split(split) else train).extend(chosen)
    if not train:
        raise FtkitError("no training rows: every source was empty or had no train split")
    random.Random(seed).shuffle(train)
    if not evaluation and test_split_size:
        count = int(test_split_size * len(train)) if test_split_size < 1 else int(test_split_size)
        count = max(1, min(count, len(train) - 1))
        evaluation, train = train[:count], train[count:]
        stats.test_split_carved = count
    return train, evaluation, stats
