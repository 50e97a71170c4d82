"""Load every source of the recipe, normalise its rows, and mix them into train and eval sets."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ftkit.config.sources import BUILDERS, FORMATS, SourceSpec, local_files  # noqa: F401 (local_files: data's callers)
from ftkit.data.formats import BadRow, detect_format, to_internal
from ftkit.errors import FtkitError
from ftkit.files import check_utf8

EVAL_WORDS = ("test", "eval", "valid", "dev")


@dataclass
class MixStats:
    rows_in: dict[str, int] = field(default_factory=dict)  # "source[split]" -> rows available
    rows_used: dict[str, int] = field(default_factory=dict)  # after weighting
    skipped: int = 0
    test_split_carved: int = 0


def is_eval_split(name: str) -> bool:
    return any(word in name.lower() for word in EVAL_WORDS)


def read_rows(files: list[Path]) -> list[dict]:
    """Every row of local files of one type, as dicts. JSON is parsed here rather than by Arrow, so every
    problem names its file and line (or row), rows may differ in shape, and a row that is not an object is
    reported instead of coerced."""
    rows: list[dict] = []
    for path in files:
        check_not_empty(path)
        found = json_rows(path) if BUILDERS[path.suffix.lower()] == "json" else arrow_rows(path)
        if not found:
            raise FtkitError(f"{path}: no rows")
        rows += found
    return rows


def check_not_empty(path: Path) -> None:
    size = path.stat().st_size
    if size == 0 or (size < 4096 and not path.read_bytes().strip()):
        raise FtkitError(f"{path}: the file is empty; it needs at least one row")


def json_rows(path: Path) -> list[dict]:
    """A JSON array of objects, one object, or JSON lines (in .jsonl, or in .json that is not one document)."""
    check_utf8(path)
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".json" and text.lstrip().startswith(("[", "{")):
        try:
            data = json.loads(text)
        except RecursionError:
            raise FtkitError(f"{path}: not valid JSON: nested too deeply") from None
        except json.JSONDecodeError as err:
            if text.lstrip().startswith("["):
                raise FtkitError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from None
            data = None  # not one object: JSON lines
        if data is not None:
            items = data if isinstance(data, list) else [data]
            for number, item in enumerate(items, 1):
                if not isinstance(item, dict):
                    raise FtkitError(f"{path}: row {number}: expected a JSON object ({{...}}), got "
                                     f"{json_kind(item)}")
            return items
    rows = []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON text may hold U+2028
        if line.strip():
            rows.append(json_line(path, number, line))
    return rows


def json_line(path: Path, number: int, line: str) -> dict:
    try:
        item = json.loads(line)
    except RecursionError:
        raise FtkitError(f"{path}:{number}: not valid JSON: nested too deeply") from None
    except json.JSONDecodeError as err:
        raise FtkitError(f"{path}:{number}: not valid JSON: {err.msg} (column {err.colno})") from None
    if not isinstance(item, dict):
        raise FtkitError(f"{path}:{number}: expected a JSON object ({{...}}) per line, got {json_kind(item)}")
    return item


def json_kind(item) -> str:
    return {list: "an array", str: "a string", bool: "true/false", type(None): "null"}.get(type(item), "a number")


def arrow_rows(path: Path) -> list[dict]:
    """CSV/TSV (after a UTF-8 check that names the line), Parquet and Arrow files, read by datasets."""
    import datasets

    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        check_utf8(path)
        if not has_data_line(path):  # datasets' own words for this: 'Instruction "train" corresponds to no data!'
            return []
    kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # it logs the error we are about to report
    try:  # datasets keys its own cache on path, size and mtime: rebuild, or an in-place edit reads stale rows
        return datasets.load_dataset(BUILDERS[suffix], data_files=[str(path)], split="train",
                                     download_mode="force_redownload", **kwargs).to_list()
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise FtkitError(f"{path}: could not be read as {suffix[1:]}: {first}") from None
    finally:
        datasets.logging.set_verbosity(level)


def has_data_line(path: Path) -> bool:
    """A CSV/TSV line after the header."""
    with open(path, encoding="utf-8") as handle:
        lines = (line for line in handle if line.strip())
        return next(lines, None) is not None and next(lines, None) is not None


def load_split(spec: SourceSpec, split: str) -> list[dict] | None:
    """One split of one source as rows; a local file has only the 'train' split (None for any other)."""
    files = local_files(spec)
    if files is not None:
        return read_rows(files) if not is_eval_split(split) else None
    import datasets

    try:
        return datasets.load_dataset(spec.path, spec.config, split=split, revision=spec.revision).to_list()
    except ValueError as err:
        if "split" in str(err).lower() or "Unknown split" in str(err):
            return None
        raise FtkitError(f"dataset '{spec.path}': {str(err).splitlines()[0]}") from None
    except Exception as err:
        from ftkit.hub import load_failure

        raise FtkitError(f"dataset '{spec.path}' could not be loaded: {load_failure(err)}") from None


def column_names(rows: list[dict]) -> list[str]:
    """Every key any row has, in order of first appearance (Arrow's union of the rows' columns)."""
    return list(dict.fromkeys(key for row in rows for key in row))


def apply_columns(rows: list[dict], spec: SourceSpec) -> list[dict]:
    if spec.columns is None:
        return rows
    have = column_names(rows)
    missing = [c for c in spec.columns if c not in have]
    if missing:
        raise FtkitError(f"source '{spec.path}': columns {missing} not found; it has {have}")
    if isinstance(spec.columns, dict):
        clash = [new for old, new in spec.columns.items() if new in have and new not in spec.columns]
        if clash:
            raise FtkitError(f"source '{spec.path}': columns: renaming to {clash} would replace existing columns of "
                             "that name; map them too (or keep a list of columns)")
        return [{spec.columns.get(k, k): v for k, v in row.items()} for row in rows]
    return [{c: row.get(c) for c in spec.columns} for row in rows]


def normalise(source_rows: list[dict], spec: SourceSpec, system_prompt: str | None, on_bad_rows: str,
              stats: MixStats) -> list[dict]:
    try:
        fmt = spec.format or detect_format(column_names(source_rows))
    except BadRow as err:
        raise FtkitError(f"source '{spec.path}': {err}") from None
    if fmt not in FORMATS:
        raise FtkitError(f"source '{spec.path}': format '{fmt}' is not one of {', '.join(FORMATS)}")
    rows, system = [], spec.system_prompt or system_prompt
    for number, row in enumerate(source_rows, 1):
        try:
            rows.append({**to_internal(row, fmt, system, spec.tools), "where": f"source '{spec.path}', row {number}"})
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
            found = load_split(spec, split)
            if found is None:
                continue
            rows = normalise(apply_columns(found, spec), spec, system_prompt, on_bad_rows, stats)
            name = f"{spec.path}[{split}]"
            stats.rows_in[name] = len(rows)
            chosen = take(rows, spec.weight, seed) if not is_eval_split(split) else rows
            stats.rows_used[name] = len(chosen)
            (evaluation if is_eval_split(split) else train).extend(chosen)
    if not train:
        if stats.skipped:
            raise FtkitError(f"no training rows: all {stats.skipped} rows were skipped as bad (on_bad_rows: skip); "
                             "set on_bad_rows: error to see the first one")
        raise FtkitError("no training rows: every source was empty or had no train split")
    random.Random(seed).shuffle(train)
    if not evaluation and test_split_size:
        count = carved_count(test_split_size, len(train))
        evaluation, train = train[:count], train[count:]
        stats.test_split_carved = count
    return train, evaluation, stats


def carved_count(test_split_size: float, rows: int) -> int:
    """Eval rows to carve off: a fraction of the rows, or a count; never as many as are left to train on."""
    count = int(test_split_size * rows) if test_split_size < 1 else int(test_split_size)
    if test_split_size >= 1 and 2 * count >= rows:
        most = (rows - 1) // 2
        fix = f"use at most {most} (or a fraction such as 0.1)" if most else "remove test_split_size"
        raise FtkitError(f"test_split_size: {count} eval rows out of {rows} would leave no more training rows than "
                         f"eval rows; {fix}")
    return max(1, min(count, rows - 1))
