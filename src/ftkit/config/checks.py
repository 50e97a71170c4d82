"""Checks across keys and against the file system that a per-key type check cannot make.

Each check returns (key, message) pairs so the recipe stage can report every problem at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ftkit.data.templates import BUILTIN_TEMPLATES
from ftkit.hub import looks_local

if TYPE_CHECKING:
    from ftkit.config.recipe import Recipe

Problems = list[tuple[str, str]]
LEGACY_DATASET_KWARGS = {"add_special_tokens", "append_concat_token"}


def check(recipe: Recipe) -> Problems:
    return check_model(recipe) + check_data(recipe) + check_training(recipe) + check_options(recipe)


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


# Attention kernels that keep packed sequences apart in a training forward. TRL's padding-free collator sends
# restarting position_ids and no attention mask, and SFTTrainer.compute_loss passes use_cache=False; with no mask
# and no cache, transformers' masking_utils builds a block-diagonal causal mask from the position_ids for eager,
# sdpa and flex_attention, and the flash kernels split sequences by them (tests/test_packing.py checks this).
# Left out: `paged|eager` (generation only; measured leaking) and kernels transformers builds no mask for.
PACKING_SAFE_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3",
                          "flash_attention_4")
EVAL_STRATEGIES = ("steps", "epoch")


def packing_attention_ok(attn_implementation: str | None) -> bool:
    """A kernel above, or a kernels-hub flash kernel (e.g. kernels-community/flash-attn3)."""
    impl = attn_implementation or "sdpa"  # transformers' default
    return impl in PACKING_SAFE_ATTENTION or ("/" in impl and "flash" in impl.lower())


def check_options(recipe) -> Problems:
    """Packing vs attention kernel and packing strategy, and early stopping's needs."""
    s, problems = recipe.sft, []
    packed = [key for key in ("packing", "padding_free") if s.get(key)]
    attn = recipe.model.attn_implementation
    if packed and not packing_attention_ok(attn):
        problems.append((packed[0], f"{packed[0]}: true puts several samples in one row, and attn_implementation "
                         f"'{attn}' would let them attend to each other; use sdpa, eager, flex_attention or "
                         f"flash_attention_2, or set {packed[0]}: false"))
    if s.get("packing") and s.get("packing_strategy") == "wrapped":
        problems.append(("packing_strategy", "'wrapped' joins samples into rows where each attends to the ones "
                         "before it, on every attention kernel; use bfd (or bfd_split)"))
    patience = recipe.run.early_stopping_patience
    if patience is not None:
        if patience < 1:
            problems.append(("early_stopping_patience", f"must be at least 1, got {patience}"))
        if s.get("eval_strategy", "no") not in EVAL_STRATEGIES:
            problems.append(("early_stopping_patience", "needs evaluation: set eval_strategy: steps (with "
                             "eval_steps) or epoch, and an eval split (dataset_splits or test_split_size)"))
        if s.get("load_best_model_at_end") is False:
            problems.append(("load_best_model_at_end", "early_stopping_patience keeps the best checkpoint, "
                             "so load_best_model_at_end cannot be false"))
    threshold = recipe.run.early_stopping_threshold
    if threshold is not None and threshold < 0:
        problems.append(("early_stopping_threshold", f"must be >= 0, got {threshold}"))
    if threshold is not None and patience is None:
        problems.append(("early_stopping_threshold", "has no effect without early_stopping_patience"))
    if s.get("load_best_model_at_end") or patience is not None:
        save, evaluate = s.get("save_strategy"), s.get("eval_strategy", "no")
        if save is not None and save not in (evaluate, "best"):
            problems.append(("save_strategy", f"load_best_model_at_end needs checkpoints at every evaluation: "
                             f"set save_strategy: {evaluate} (it is '{save}')"))
    return problems
