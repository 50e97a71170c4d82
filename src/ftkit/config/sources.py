"""Turn the recipe's dataset keys (dataset_mixer, dataset_mixture, dataset_name) into one list of sources.

Pure Python: `ftkit validate` uses it to check that local sources exist without importing datasets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftkit.config.arguments import DataArguments
from ftkit.errors import FtkitError


FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")  # a source's `format`
# file name ending -> the datasets builder that reads it
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


class SourcesError(ValueError):
    """A malformed dataset key; `key` is the recipe key to name."""

    def __init__(self, message: str, key: str = "dataset_mixture"):
        super().__init__(message)
        self.key = key


MIXTURE_OPTIONS = {"datasets", "seed", "test_split_size"}
ENTRY_FIELDS = {"id", "path", "config", "revision", "split", "splits", "columns", "weight", "system_prompt", "format",
                "tools"}


@dataclass
class SourceSpec:
    path: str  # hub id, local file or folder
    weight: float = 1.0  # <= 1: fraction of the rows; > 1: number of rows
    config: str | None = None
    splits: list[str] = field(default_factory=lambda: ["train"])
    columns: list[str] | dict[str, str] | None = None  # keep these columns, or rename {theirs: ours}
    system_prompt: str | None = None
    revision: str | None = None  # hub dataset branch, tag or commit (part of the token cache key)
    format: str | None = None  # override the detected format: messages, sharegpt, alpaca, prompt_completion, text
    tools: list | None = None  # function schemas for rows without their own `tools` (read from the file if a path)
    key: str = "dataset_mixer"  # the recipe key it came from, for error messages


def sources_from_recipe(data: DataArguments) -> list[SourceSpec]:
    splits = data.dataset_splits or ["train"]
    if data.dataset_mixer:
        configs = data.dataset_configs or [None] * len(data.dataset_mixer)
        if len(configs) != len(data.dataset_mixer):
            raise SourcesError("needs one entry per dataset_mixer source", "dataset_configs")
        return [
            SourceSpec(path=str(name), weight=float(w), config=c, splits=list(splits))
            for (name, w), c in zip(data.dataset_mixer.items(), configs)
        ]
    if data.dataset_mixture:
        return [mixture_entry(e, i) for i, e in enumerate(mixture_entries(data.dataset_mixture))]
    if data.dataset_name:
        test = [data.dataset_test_split] if data.dataset_test_split else []
        split_list = data.dataset_splits or [data.dataset_train_split, *test]
        return [SourceSpec(path=data.dataset_name, config=data.dataset_config, splits=split_list, key="dataset_name")]
    return []


def mixture_entries(mixture: Any) -> list:
    if isinstance(mixture, dict):
        unknown = set(mixture) - MIXTURE_OPTIONS
        if unknown:
            raise SourcesError(f"unknown field(s) {', '.join(sorted(map(str, unknown)))}; known: "
                               f"{', '.join(sorted(MIXTURE_OPTIONS))}")
        seed = mixture.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32):
            raise SourcesError(f"seed must be a whole number in [0, 2**32), got {seed!r}")
    entries = mixture.get("datasets") if isinstance(mixture, dict) else mixture
    if not isinstance(entries, list) or not entries:
        raise SourcesError("expected a list of {id, config, split, columns, weight} (or that list under 'datasets')")
    return entries


def mixture_entry(entry: Any, index: int) -> SourceSpec:
    where = f"entry {index + 1}"
    if not isinstance(entry, dict) or not (entry.get("id") or entry.get("path")):
        raise SourcesError(f"{where} needs an 'id' (hub id or local path)")
    unknown = set(entry) - ENTRY_FIELDS
    if unknown:
        raise SourcesError(f"{where}: unknown field(s) {', '.join(sorted(map(str, unknown)))}; known: "
                           f"{', '.join(sorted(ENTRY_FIELDS))}")
    for name in ("id", "path", "config", "revision", "system_prompt", "format"):
        if entry.get(name) is not None and not isinstance(entry[name], str):
            raise SourcesError(f"{where}: '{name}' must be text, got {entry[name]!r}")
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
        raise SourcesError(f"{where}: 'weight' must be a number >= 0, got {weight!r}")
    split = entry.get("splits") or entry.get("split") or "train"
    splits = [split] if isinstance(split, str) else split
    if not isinstance(splits, list) or not splits or not all(isinstance(s, str) for s in splits):
        raise SourcesError(f"{where}: 'split' must be a split name or a list of them, got {split!r}")
    columns = entry.get("columns")
    names = list(columns) + list(columns.values()) if isinstance(columns, dict) else columns
    if columns is not None and not (isinstance(names, list) and all(isinstance(c, str) for c in names)):
        raise SourcesError(f"{where}: 'columns' must be a list of column names or a mapping {{theirs: ours}}, "
                           f"got {columns!r}")
    return SourceSpec(path=entry.get("id") or entry["path"], weight=float(weight), config=entry.get("config"),
                      splits=list(splits), columns=columns, system_prompt=entry.get("system_prompt"),
                      format=entry.get("format"), revision=entry.get("revision"), key="dataset_mixture",
                      tools=source_tools(entry.get("tools"), where))


def source_tools(raw: Any, where: str) -> list | None:
    """A source's `tools`: function schemas inline, or the path of a JSON file holding them (its content is read
    here, so the token cache key covers it)."""
    from ftkit.config.templates import normalise_tools
    from ftkit.errors import BadRow

    if isinstance(raw, str) and not raw.lstrip().startswith(("[", "{")):
        path = Path(raw).expanduser()
        try:
            raw = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            problem = "not UTF-8 text" if isinstance(err, UnicodeDecodeError) else err.strerror or err
            raise SourcesError(f"{where}: 'tools' file '{raw}' cannot be read ({problem})") from None
    try:
        return normalise_tools(raw, f"{where}: 'tools'")
    except BadRow as err:
        raise SourcesError(str(err)) from None


def mixture_option(data: DataArguments, name: str) -> Any:
    """`seed` / `test_split_size` given inside a dataset_mixture mapping."""
    return data.dataset_mixture.get(name) if isinstance(data.dataset_mixture, dict) else None


def data_seed(recipe) -> int:
    """The seed for sampling and splitting: the mixture's own, else data_seed, else seed (0 is a seed)."""
    for value in (mixture_option(recipe.data, "seed"), recipe.sft.get("data_seed")):
        if value is not None:
            return value
    return recipe.sft_value("seed")


def local_files(spec: SourceSpec) -> list[Path] | None:
    """The data files of a local source (a file, or a folder of one type); None for a hub id."""
    path = Path(spec.path).expanduser()
    if path.is_file():
        if path.suffix.lower() not in BUILDERS:
            raise FtkitError(f"{path}: not a data file ftkit reads (a name ending in {', '.join(BUILDERS)})")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in BUILDERS and p.is_file())
        if not files:
            raise FtkitError(f"{path}: folder has no data files ({', '.join(BUILDERS)})")
        suffixes = sorted({p.suffix.lower() for p in files})
        if len(suffixes) > 1:
            raise FtkitError(f"{path}: mixes file types {suffixes}; use one type per source")
        return files
    return None
