"""Checks across keys and against the file system that a per-key type check cannot make.

Each check returns (key, message) pairs so the recipe stage can report every problem at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ftkit.data.templates import BUILTIN_TEMPLATES

if TYPE_CHECKING:
    from ftkit.recipe import Recipe

Problems = list[tuple[str, str]]
LEGACY_DATASET_KWARGS = {"add_special_tokens", "append_concat_token"}


def looks_local(name: str) -> bool:
    """A hub id is `name` or `org/name`; anything else (./x, /x, ~/x, a/b/c, x.jsonl) is a local path."""
    return (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or Path(name).suffix.lower() in {".json", ".jsonl", ".csv", ".tsv", ".parquet", ".arrow", ".txt"}
        or Path(name).exists()
    )


def check(recipe: Recipe) -> Problems:
    from ftkit import train_options  # packing vs attention, early stopping (no torch)

    return check_model(recipe) + check_data(recipe) + check_training(recipe) + train_options.check(recipe)


def check_model(recipe: Recipe) -> Problems:
    m, problems = recipe.model, []
    if not m.model_name_or_path:
        problems.append(("model_name_or_path", "missing: set it to a local model directory or a hub id"))
    for key in ("model_name_or_path", "tokenizer_name_or_path"):
        name = getattr(m, key)
        if name and looks_local(name) and not Path(name).expanduser().is_dir():
            problems.append((key, f"'{name}' is not a directory (for a hub model use its id, e.g. google/gemma-2b)"))
    if m.load_in_4bit and m.load_in_8bit:
        problems.append(("load_in_4bit", "load_in_4bit and load_in_8bit are exclusive: choose one"))
    if (m.load_in_4bit or m.load_in_8bit) and not m.use_peft:
        problems.append(("use_peft", "a quantised model cannot be fully fine-tuned: set use_peft: true (QLoRA)"))
    if m.use_peft:
        if m.lora_r < 1:
            problems.append(("lora_r", f"must be at least 1, got {m.lora_r}"))
        if m.lora_alpha <= 0:
            problems.append(("lora_alpha", f"must be positive, got {m.lora_alpha}"))
        if not 0 <= m.lora_dropout < 1:
            problems.append(("lora_dropout", f"must be in [0, 1), got {m.lora_dropout}"))
    return problems


def check_data(recipe: Recipe) -> Problems:
    d, problems = recipe.data, []
    given = [k for k in ("dataset_mixer", "dataset_mixture", "dataset_name") if getattr(d, k)]
    if not given:
        problems.append(("dataset_mixer", "no dataset: set dataset_mixer (source: weight), dataset_mixture or dataset_name"))
    if len(given) > 1:
        problems.append((given[1], f"give one of {', '.join(given)}, not several"))
    for source, weight in (d.dataset_mixer or {}).items():
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight < 0:
            problems.append(("dataset_mixer", f"weight of '{source}' must be a number >= 0, got {weight!r}"))
    problems += check_sources(recipe)
    if d.dataset_splits is not None and not all(isinstance(s, str) for s in d.dataset_splits):
        problems.append(("dataset_splits", "must be a list of split names"))
    if d.test_split_size is not None and d.test_split_size <= 0:
        problems.append(("test_split_size", f"must be a fraction in (0, 1) or a row count, got {d.test_split_size}"))
    if d.streaming and recipe.sft.get("max_steps", -1) <= 0:
        problems.append(("streaming", "a streamed dataset has no known length: set max_steps"))
    template = d.chat_template
    if template and template not in BUILTIN_TEMPLATES and "{" not in template and not Path(template).is_file():
        names = ", ".join(BUILTIN_TEMPLATES)
        problems.append(("chat_template", f"'{template}' is neither a built-in template ({names}) nor a file"))
    return problems


def check_sources(recipe: Recipe) -> Problems:
    from ftkit.data.sources import SourceSpec, sources_from_recipe

    problems = []
    try:
        specs: list[SourceSpec] = sources_from_recipe(recipe.data)
    except ValueError as err:
        return [("dataset_mixture", str(err))]
    from ftkit.data.formats import FORMATS

    for spec in specs:
        if looks_local(spec.path) and not Path(spec.path).expanduser().exists():
            problems.append((spec.key, f"data source '{spec.path}' does not exist"))
        if spec.format is not None and spec.format not in FORMATS:
            problems.append((spec.key, f"format '{spec.format}' of '{spec.path}' is not one of {', '.join(FORMATS)}"))
    return problems


def check_training(recipe: Recipe) -> Problems:
    s, problems = recipe.sft, []

    def at_least(key: str, low: float, strict: bool = False):
        value = s.get(key)
        if value is not None and (value <= low if strict else value < low):
            problems.append((key, f"must be {'>' if strict else '>='} {low:g}, got {value}"))

    at_least("learning_rate", 0, strict=True)
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "max_length", "save_total_limit", "logging_steps"):
        at_least(key, 1)
    at_least("warmup_steps", 0)
    at_least("max_grad_norm", 0)
    if s.get("max_steps", -1) <= 0 and s.get("num_train_epochs", 1) <= 0:
        problems.append(("num_train_epochs", "must be > 0 when max_steps is not set"))
    if s.get("bf16") and s.get("fp16"):
        problems.append(("bf16", "bf16 and fp16 are exclusive: choose one"))
    kwargs = s.get("dataset_kwargs")
    if isinstance(kwargs, dict) and LEGACY_DATASET_KWARGS & kwargs.keys():
        recipe.notes.append(
            "dataset_kwargs: add_special_tokens/append_concat_token are from older TRL; ftkit renders every sample "
            "through the chat template, which places BOS/EOS itself; ignored"
        )
        s["dataset_kwargs"] = {k: v for k, v in kwargs.items() if k not in LEGACY_DATASET_KWARGS} or None
    return problems
