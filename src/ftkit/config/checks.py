"""Checks across keys and against the file system that a per-key type check cannot make.

Each check returns (key, message) pairs so the recipe stage can report every problem at once.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
from pathlib import Path

from ftkit.config.arguments import ModelArguments
from ftkit.config.schema import MODEL_INIT_OWNED, Recipe
from ftkit.config.templates import BUILTIN_TEMPLATES
from ftkit.errors import FtkitError
from ftkit.files import read_text
from ftkit.hub import RESERVED_NAMESPACES, looks_local


Problems = list[tuple[str, str]]
LEGACY_DATASET_KWARGS = {"add_special_tokens", "append_concat_token"}
# transformers' reporting integrations (INTEGRATION_TO_CALLBACK in transformers/integrations/integration_utils.py)
# plus its two words; a copy because importing that module imports torch, and validate must not.
# tests/test_recipe.py fails when transformers' list changes.
REPORT_TO = ("azure_ml", "clearml", "codecarbon", "comet_ml", "dagshub", "dvclive", "flyte", "kubeflow", "mlflow",
             "neptune", "swanlab", "tensorboard", "trackio", "wandb")
REPORT_TO_WORDS = ("all", "none")
LORA_ONLY = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_parameters",
             "lora_modules_to_save", "use_dora", "use_rslora")
SEED_LIMIT = 2**32  # numpy's seeds


def check(recipe: Recipe) -> Problems:
    return (check_model(recipe) + check_data(recipe) + check_training(recipe) + check_options(recipe)
            + check_kernels(recipe) + check_preference(recipe))


def check_preference(recipe: Recipe) -> Problems:
    """Combinations TRL's preference trainers refuse only after the model loaded, and SFT-only data options."""
    s, m, method, problems = recipe.sft, recipe.model, recipe.method, []
    if method == "sft":
        return []
    if recipe.data.streaming:
        problems.append(("streaming", f"{method} trains on tokenised pairs held in memory; set streaming: false"))
    if recipe.data.train_on != "assistant":
        problems.append(("train_on", f"{method} trains on the answers only; remove train_on"))
    if s.get("beta") is not None and s["beta"] <= 0:
        problems.append(("beta", f"must be > 0, got {s['beta']}"))
    weights, losses = s.get("loss_weights"), s.get("loss_type")
    if weights is not None and isinstance(losses, list) and len(weights) != len(losses):
        problems.append(("loss_weights", f"gives {len(weights)} weight(s) for {len(losses)} loss_type(s); give one "
                         "per loss"))
    if s.get("sync_ref_model") and m.use_peft:
        problems.append(("sync_ref_model", "needs full fine-tuning: with LoRA the reference is the model with its "
                         "adapter off, so there is no reference copy to sync; set use_peft: false or remove it"))
    if method == "kto" and s.get("loss_type", "kto") == "kto" and s.get("per_device_train_batch_size", 8) < 2:
        problems.append(("per_device_train_batch_size", "KTO estimates its KL term from the other completions of a "
                         "batch: it needs at least 2 per device"))
    targets = m.lora_target_modules
    if m.use_peft and method in ("dpo", "kto") and "lm_head" in ([targets] if isinstance(targets, str) else targets or []):
        problems.append(("lora_target_modules", f"{method} reads lm_head's weight directly, so a LoRA adapter on it "
                         "would never train; train it whole with lora_modules_to_save: [lm_head] instead"))
    return problems


def check_model(recipe: Recipe) -> Problems:
    m, problems = recipe.model, []
    if not m.model_name_or_path:
        problems.append(("model_name_or_path", "missing: set it to a local model directory or a hub id"))
    for key, needs in (("model_name_or_path", ("config.json",)),
                       ("tokenizer_name_or_path", ("tokenizer_config.json", "tokenizer.json"))):
        name = getattr(m, key)
        if key == "model_name_or_path" and recipe.method != "sft" and name and is_run(name):
            continue  # a preference run starts from a finished ftkit run (train/start.py)
        problem = local_dir_problem(name, needs) if name else None
        if problem:
            problems.append((key, problem))
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
    else:
        defaults = ModelArguments()
        unused = [k for k in LORA_ONLY if getattr(m, k) != getattr(defaults, k)]
        if unused:
            recipe.notes.append(f"{', '.join(unused)} {'is' if len(unused) == 1 else 'are'} ignored without "
                                "use_peft: true")
    return problems


def is_run(name: str) -> bool:
    from ftkit import rundir

    path = Path(name).expanduser()
    return path.is_dir() and rundir.state(path) == "finished"


def local_dir_problem(name: str, needs: tuple[str, ...]) -> str | None:
    """A local model or tokenizer path that is missing, or a directory without the file that makes it one."""
    from ftkit import rundir

    path = Path(name).expanduser()
    unfinished = path.is_dir() and rundir.unfinished_problem(path)
    if unfinished:
        return f"'{name}': {unfinished}"
    if path.is_dir():
        if any((path / file).is_file() for file in needs):
            return None
        if (path / "adapter_config.json").is_file():
            return (f"'{name}' is a LoRA adapter (adapter_config.json), not a model; use its base model, or merge it "
                    f"first: ftkit merge --adapter {name} --output DIR")
        what = "model" if "config.json" in needs else "tokenizer"
        return f"'{name}' has no {' or '.join(needs)}, so it is not a {what} directory"
    if not looks_local(name):
        return None
    siblings = [p.name for p in path.parent.iterdir()] if path.parent.is_dir() else []
    close = difflib.get_close_matches(path.name, siblings, n=1)
    if close:
        hint = f"did you mean '{path.parent / close[0]}'?"
    elif name.split("/", 1)[0] in RESERVED_NAMESPACES:  # never a hub id: say where the path was looked for
        hint = f"relative to {Path.cwd()}"
    else:
        hint = "for a hub model use its id, e.g. google/gemma-2b"
    return f"'{name}' is not a directory ({hint})"


def check_data(recipe: Recipe) -> Problems:
    d, problems = recipe.data, []
    given = [k for k in ("dataset_mixer", "dataset_mixture", "dataset_name") if getattr(d, k)]
    if not given:
        problems.append(("dataset_mixer", "no dataset: set dataset_mixer (source: weight), dataset_mixture or dataset_name"))
    if len(given) > 1:
        problems.append((given[1], f"give one of {', '.join(given)}, not several"))
    weights = [("dataset_mixer", f"weight of '{source}' must be a number >= 0, got {weight!r}")
               for source, weight in (d.dataset_mixer or {}).items() if not is_number(weight) or not weight >= 0]
    problems += weights or check_sources(recipe)  # the sources are read as numbers once every weight is one
    if d.dataset_splits is not None and not all(isinstance(s, str) for s in d.dataset_splits):
        problems.append(("dataset_splits", "must be a list of split names"))
    problems += check_test_split(recipe)
    if d.streaming and recipe.sft.get("max_steps", -1) <= 0:
        problems.append(("streaming", "a streamed dataset has no known length: set max_steps"))
    problems += check_template(d.chat_template)
    if d.chat_template_kwargs is not None:
        from ftkit.config.templates import template_kwargs_problem

        problem = template_kwargs_problem(d.chat_template_kwargs)
        if problem:
            problems.append(("chat_template_kwargs", problem))
    return problems


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_test_split(recipe: Recipe) -> Problems:
    """A fraction below 0.5 or a whole number of rows; the count is checked against the rows when they are read."""
    from ftkit.config.sources import mixture_option

    key, size, label = "test_split_size", recipe.data.test_split_size, ""
    if size is None:  # inside dataset_mixture: name the field
        key, size, label = "dataset_mixture", mixture_option(recipe.data, "test_split_size"), "test_split_size "
    if size is None:
        return []
    if not is_number(size) or size <= 0:
        problem = f"must be a fraction in (0, 0.5) or a row count, got {size!r}"
    elif 0.5 <= size < 1:
        problem = (f"{size} would leave no more training rows than eval rows; use a fraction below 0.5 (e.g. 0.1) "
                   "or a row count")
    elif size >= 1 and size != int(size):
        problem = f"{size} is neither a fraction below 1 nor a whole number of rows"
    elif recipe.data.streaming and size < 1:
        problem = (f"{size} is a fraction, and with streaming: true the stream's length is unknown: give a row "
                   "count (e.g. 100)")
    else:
        return []
    return [(key, label + problem)]


def check_template(template: str | None) -> Problems:
    if not template or template in BUILTIN_TEMPLATES or "{" in template:
        return []
    if not Path(template).expanduser().is_file():
        names = ", ".join(BUILTIN_TEMPLATES)
        return [("chat_template", f"'{template}' is neither a built-in template ({names}) nor a file")]
    try:
        read_text(Path(template).expanduser(), "chat template (Jinja text)")
    except FtkitError as err:
        return [("chat_template", str(err))]
    return []


def check_sources(recipe: Recipe) -> Problems:
    from ftkit.config.sources import FORMATS
    from ftkit.config.sources import local_files
    from ftkit.config.sources import SourceSpec, SourcesError, sources_from_recipe

    problems = []
    try:
        specs: list[SourceSpec] = sources_from_recipe(recipe.data)
    except SourcesError as err:
        return [(err.key, str(err))]
    for spec in specs:
        if looks_local(spec.path) and not Path(spec.path).expanduser().exists():
            problems.append((spec.key, f"data source '{spec.path}' does not exist"))
        else:
            try:
                local_files(spec)
            except FtkitError as err:
                problems.append((spec.key, str(err)))
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
    if s.get("max_steps", -1) < -1:
        problems.append(("max_steps", f"must be a number of steps, or -1 to train for num_train_epochs; got "
                         f"{s['max_steps']}"))
    elif s.get("max_steps", -1) <= 0 and s.get("num_train_epochs", 1) <= 0:
        problems.append(("num_train_epochs", "must be > 0 when max_steps is not set"))
    for key in ("seed", "data_seed"):
        if s.get(key) is not None and not 0 <= s[key] < SEED_LIMIT:
            problems.append((key, f"must be in [0, 2**32), got {s[key]}"))
    run = recipe.run
    if run.eval_samples is not None and run.eval_samples < 0:
        problems.append(("eval_samples", f"must be >= 0 (0 answers no eval prompts), got {run.eval_samples}"))
    if run.eval_samples_max_new_tokens < 1:  # generate() would refuse it after the run directory was claimed
        problems.append(("eval_samples_max_new_tokens", f"must be >= 1, got {run.eval_samples_max_new_tokens}"))
    problems += check_report_to(s.get("report_to")) + check_resume(s.get("resume_from_checkpoint"))
    problems += check_output_dir(recipe)
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


def check_report_to(report) -> Problems:
    names = [report] if isinstance(report, str) else report or []
    bad = [name for name in names if name not in REPORT_TO + REPORT_TO_WORDS]
    if not bad:
        return []
    close = difflib.get_close_matches(str(bad[0]), REPORT_TO, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return [("report_to", f"{bad[0]!r} is not a reporting integration{hint}; use one or more of: "
             f"{', '.join(REPORT_TO)}, or all, or none")]


def check_resume(resume) -> Problems:
    """resume_from_checkpoint: true (the newest checkpoint of output_dir) or the path of a checkpoint-N."""
    if not isinstance(resume, str):
        return []
    path = Path(resume).expanduser()
    if not path.exists():
        return [("resume_from_checkpoint", f"'{resume}' does not exist; give a checkpoint-N directory, or true for "
                 "the newest checkpoint in output_dir")]
    if not (path / "trainer_state.json").is_file():
        return [("resume_from_checkpoint", f"'{resume}' is not a complete checkpoint directory (no "
                 "trainer_state.json)")]
    return []


def check_output_dir(recipe: Recipe) -> Problems:
    """output_dir may not be, or contain, the model being trained: replacing a run there would delete it."""
    out = recipe.output_dir().expanduser().resolve()
    for key in ("model_name_or_path", "tokenizer_name_or_path"):
        name = getattr(recipe.model, key)
        if name and Path(name).expanduser().is_dir():
            source = Path(name).expanduser().resolve()
            if source == out or out in source.parents:
                return [("output_dir", f"'{recipe.output_dir()}' {'is' if source == out else 'contains'} the "
                         f"{key} directory '{name}'; choose another output_dir")]
    return []


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


def check_kernels(recipe: Recipe) -> Problems:
    """Liger's kernels and model_init_kwargs, checked before anything loads (transformers would raise an
    ImportError after the model loaded, or a duplicate-argument TypeError)."""
    s, problems = recipe.sft, []
    if s.get("use_liger_kernel") and importlib.util.find_spec("liger_kernel") is None:
        problems.append(("use_liger_kernel", "needs the liger-kernel package (pip install liger-kernel), whose "
                         "Triton kernels run on CUDA GPUs only; or set use_liger_kernel: false"))
    init = s.get("model_init_kwargs")
    if isinstance(init, str):
        problems.append(("model_init_kwargs", "must be a mapping of from_pretrained arguments, e.g. "
                         "{use_kernels: true}"))
    for key in sorted(set(init or {}) & MODEL_INIT_OWNED.keys() if isinstance(init, dict) else []):
        problems.append(("model_init_kwargs", f"'{key}' is set by the recipe key {MODEL_INIT_OWNED[key]}; "
                         "set it there instead"))
    return problems


def check_for_device(recipe: Recipe, device: str) -> None:
    """Options that need a GPU, refused once the device is known (validate runs on any machine)."""
    if device == "cpu" and recipe.sft.get("use_liger_kernel"):
        raise FtkitError("use_liger_kernel: Liger's Triton kernels run on CUDA GPUs only and this run is on the "
                         "CPU; set use_liger_kernel: false")
