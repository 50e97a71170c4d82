"""Turn the recipe's dataset keys (dataset_mixer, dataset_mixture, dataset_name) into one list of sources.

Pure Python: `ftkit validate` uses it to check that local sources exist without importing datasets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ftkit.config.arguments import DataArguments


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
    key: str = "dataset_mixer"  # the recipe key it came from, for error messages


def sources_from_recipe(data: DataArguments) -> list[SourceSpec]:
    splits = data.dataset_splits or ["train"]
    if data.dataset_mixer:
        configs = data.dataset_configs or [None] * len(data.dataset_mixer)
        if len(configs) != len(data.dataset_mixer):
            raise ValueError("dataset_configs needs one entry per dataset_mixer source")
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
    entries = mixture.get("datasets") if isinstance(mixture, dict) else mixture
    if not isinstance(entries, list) or not entries:
        raise ValueError("expected a list of {id, config, split, columns, weight} (or that list under 'datasets')")
    return entries


def mixture_entry(entry: Any, index: int) -> SourceSpec:
    known = {"id", "path", "config", "revision", "split", "splits", "columns", "weight", "system_prompt", "format"}
    if not isinstance(entry, dict) or not (entry.get("id") or entry.get("path")):
        raise ValueError(f"entry {index + 1} needs an 'id' (hub id or local path)")
    unknown = set(entry) - known
    if unknown:
        raise ValueError(f"entry {index + 1}: unknown field(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    split = entry.get("splits") or entry.get("split") or "train"
    return SourceSpec(
        path=str(entry.get("id") or entry.get("path")),
        weight=float(entry.get("weight", 1.0)),
        config=entry.get("config"),
        splits=[split] if isinstance(split, str) else list(split),
        columns=entry.get("columns"),
        system_prompt=entry.get("system_prompt"),
        format=entry.get("format"),
        revision=entry.get("revision"),
        key="dataset_mixture",
    )


def mixture_option(data: DataArguments, name: str) -> Any:
    """`seed` / `test_split_size` given inside a dataset_mixture mapping."""
    return data.dataset_mixture.get(name) if isinstance(data.dataset_mixture, dict) else None


def data_seed(recipe) -> int:
    """The seed for sampling and splitting: the mixture's own, else data_seed, else seed (0 is a seed)."""
    for value in (mixture_option(recipe.data, "seed"), recipe.sft.get("data_seed")):
        if value is not None:
            return value
    return recipe.sft_value("seed")
