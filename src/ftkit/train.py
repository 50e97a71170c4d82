"""Train stage: wire recipe -> data -> model into TRL's SFTTrainer, then write the run's artifacts."""

from __future__ import annotations

import os
import time
from pathlib import Path

from ftkit.errors import FtkitError
from ftkit.recipe import HANDLED_SFT_KEYS, Recipe

FINISHED_MARKERS = ("train_summary.json", "adapter_model.safetensors", "model.safetensors")


def guard_output_dir(recipe: Recipe) -> Path:
    """Never train over a finished run unless the recipe asks (overwrite_output_dir) or resumes."""
    out = recipe.output_dir()
    if not out.exists() or recipe.run.overwrite_output_dir or recipe.sft.get("resume_from_checkpoint"):
        return out
    if any((out / marker).exists() for marker in FINISHED_MARKERS):
        raise FtkitError(f"output_dir '{out}' already holds a finished run; choose another output_dir, "
                         "or set overwrite_output_dir: true to replace it")
    if any(out.glob("checkpoint-*")):
        raise FtkitError(f"output_dir '{out}' holds checkpoints of an unfinished run; set "
                         "resume_from_checkpoint: true to continue it, or overwrite_output_dir: true to start over")
    return out


def setup_reporting(recipe: Recipe, out: Path, log=print) -> None:
    """wandb without an API key would block on a login prompt: run it offline and say so. Its files go
    into output_dir rather than the user's working directory."""
    report = recipe.sft.get("report_to") or []
    report = [report] if isinstance(report, str) else report
    if "wandb" in report or "all" in report:
        os.environ.setdefault("WANDB_DIR", str(out))
    for key, env in (("wandb_entity", "WANDB_ENTITY"), ("wandb_project", "WANDB_PROJECT"),
                     ("wandb_run_group", "WANDB_RUN_GROUP")):
        if getattr(recipe.run, key):
            os.environ[env] = getattr(recipe.run, key)
    if ("wandb" in report or "all" in report) and not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
        if not (Path.home() / ".netrc").is_file():
            os.environ["WANDB_MODE"] = "offline"
            log(f"note: no wandb API key found; wandb logs offline to {out}/wandb (upload later with `wandb sync`)")


def sft_config(recipe: Recipe, precision, out: Path, has_eval: bool):
    from trl import SFTConfig

    args = {k: v for k, v in recipe.sft.items() if k not in HANDLED_SFT_KEYS}
    args.pop("resume_from_checkpoint", None)
    args.update(output_dir=str(out), bf16=precision.bf16, fp16=precision.fp16,
                use_cpu=precision.device == "cpu", include_num_input_tokens_seen="all",
                trust_remote_code=recipe.model.trust_remote_code)
    if not has_eval and args.get("eval_strategy", "no") != "no":
        raise FtkitError("eval_strategy is set but there is no eval split: add a test split to dataset_splits "
                         "or set test_split_size")
    # transformers 5.23 renamed gradient_checkpointing* to activation_checkpointing*; recipes use either.
    args["activation_checkpointing"] = checkpointing_enabled(recipe.sft)
    kwargs = args.pop("activation_checkpointing_kwargs", None) or args.pop("gradient_checkpointing_kwargs", None)
    args.pop("gradient_checkpointing", None)
    args.pop("gradient_checkpointing_kwargs", None)
    if args["activation_checkpointing"]:
        args["activation_checkpointing_kwargs"] = kwargs or {"use_reentrant": False}
    args.setdefault("report_to", "none")
    # transformers replaces NaN/inf losses in the logs by the window's average (0 when all are bad), hiding
    # exactly what NonFiniteLossGuard must see; ftkit stops on them instead.
    args.setdefault("logging_nan_inf_filter", False)
    from ftkit import train_options

    args = train_options.apply(recipe, args)  # early stopping: load_best_model_at_end, checkpoints per evaluation
    try:
        return SFTConfig(**args)
    except (ValueError, TypeError) as err:
        raise FtkitError(f"training arguments rejected: {str(err).splitlines()[0]}") from None


def checkpointing_enabled(sft: dict) -> bool:
    """TRL's SFTConfig turns checkpointing on by default; a recipe may say so under either name."""
    for key in ("activation_checkpointing", "gradient_checkpointing"):
        if sft.get(key) is not None:
            return bool(sft[key])
    return True


def data_summary(stats) -> str:
    share = 100 * stats.trained_tokens / max(stats.tokens, 1)
    parts = [f"data: {stats.train_rows:,} train / {stats.eval_rows:,} eval samples",
             f"{stats.trained_tokens:,} of {stats.tokens:,} tokens carry loss ({share:.0f}%)"]
    if stats.test_split_carved:
        parts.append(f"eval split of {stats.test_split_carved} carved from train")
    counts = {"truncated": stats.truncated, "dropped (too long)": stats.dropped_overlong,
              "dropped (no loss tokens)": stats.dropped_no_loss, "skipped (bad rows)": stats.skipped_bad_rows}
    parts += [f"{n} {what}" for what, n in counts.items() if n]
    return "; ".join(parts)


def check_token_ids(dataset, model, top: int | None = None) -> None:
    """An id beyond the embedding matrix crashes CUDA with `srcIndex < srcSelectDimSize`: refuse it early.
    `top` is the largest id when tokenising already recorded it; otherwise the dataset is scanned."""
    rows = model.get_input_embeddings().weight.shape[0]
    if top is None:
        top = max((max(ids) for ids in dataset["input_ids"] if ids), default=-1)
    if top >= rows:
        raise FtkitError(f"token id {top} is outside the model's embedding matrix ({rows} rows); the tokenizer "
                         "does not match the model: check tokenizer_name_or_path")


def eval_samples_before(trainer, recipe: Recipe, chat_format, conversations: list, state, log=print) -> list:
    """Answer a few eval prompts with the untouched model; [] when eval_samples is 0 or not possible."""
    from ftkit import samples as eval_samples

    count = recipe.run.eval_samples if recipe.run.eval_samples is not None else (5 if conversations else 0)
    if count <= 0 or not conversations:
        return []
    if state.num_processes > 1:
        log("note: eval_samples skipped: before/after generation runs only in single-process training")
        return []
    picked = eval_samples.pick_samples(conversations, count)
    eval_samples.answer_all(trainer.model, chat_format, picked, "before", recipe.run.eval_samples_max_new_tokens)
    return picked


def eval_samples_after(trainer, recipe: Recipe, chat_format, picked: list, summary: dict, log=print) -> dict:
    import json

    from ftkit import samples as eval_samples

    eval_samples.answer_all(trainer.model, chat_format, picked, "after", recipe.run.eval_samples_max_new_tokens)
    out = Path(trainer.args.output_dir)
    eval_samples.write_markdown(picked, out / "samples.md")
    summary["eval_samples"] = {"count": len(picked), "before": eval_samples.scores(picked, "before"),
                               "after": eval_samples.scores(picked, "after")}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    log(f"eval samples (greedy; full text in {out / 'samples.md'}):")
    log(eval_samples.table(picked))
    before, after = summary["eval_samples"]["before"], summary["eval_samples"]["after"]
    log(f"exact match {before['exact_match']:.0%} -> {after['exact_match']:.0%}, chrF {before['chrf']:.1f} -> {after['chrf']:.1f}")
    return summary


def _quiet(*_args, **_kwargs) -> None:
    return None


def run_training(recipe: Recipe, use_cache: bool = True, log=print) -> Path:
    """recipe -> data -> model -> SFTTrainer -> artifacts in output_dir."""
    started = time.time()
    out = guard_output_dir(recipe)
    from ftkit.launch import check_launch, is_main_process, plan_from_environment

    check_launch(recipe, plan_from_environment())  # when `accelerate launch` started us without ftkit's launcher
    if not is_main_process():  # notes, data and summary lines once, from rank 0; the others stay quiet
        log = _quiet
    setup_reporting(recipe, out, log)
    from ftkit.data.sources import sources_from_recipe
    from ftkit.hub import prepare_hub_access

    prepare_hub_access([recipe.model.model_name_or_path, recipe.model.tokenizer_name_or_path,
                        *(s.path for s in sources_from_recipe(recipe.data))], log)

    import torch
    from accelerate import PartialState

    from ftkit.data.pipeline import build_datasets
    from ftkit.model import load_tokenizer, resolve_precision

    precision = resolve_precision(recipe.model, recipe.sft)
    # cpu=True on CPU: otherwise accelerate sees a single process there and main_process_first() waits for nobody
    state = PartialState(cpu=precision.device == "cpu")
    torch.manual_seed(recipe.sft.get("seed", 42))
    tokenizer, chat_format, added = load_tokenizer(recipe.model, recipe.data.chat_template, log)
    with state.main_process_first():
        data = build_datasets(recipe, chat_format, use_cache, log)
    model, resized = prepare_model(recipe, precision, state, tokenizer, bool(added), data, log)
    trainer, loss_guard = build_trainer(recipe, model, tokenizer, precision, state, out, data, log)
    samples = eval_samples_before(trainer, recipe, chat_format, data.eval_conversations, state, log)
    result = trainer.train(resume_from_checkpoint=recipe.sft.get("resume_from_checkpoint"))
    if loss_guard.bad_step is not None:
        raise FtkitError(loss_guard.message())
    write_outputs(trainer, recipe, chat_format, data.stats, result, started, resized, precision, samples, log)
    return out


def prepare_model(recipe: Recipe, precision, state, tokenizer, new_tokens: bool, data, log=print):
    """The model loaded, its embeddings fitted to the tokenizer, every token id checked, PEFT applied."""
    from ftkit.model import apply_peft, fit_embeddings, load_model, trainable_summary

    model = load_model(recipe.model, precision, state.local_process_index)
    resized = fit_embeddings(model, tokenizer, log)
    if not recipe.data.streaming:  # a stream cannot be scanned ahead; fit_embeddings still bounds every id
        check_token_ids(data.train, model, data.stats.max_token_id)
        log(data_summary(data.stats))
    if recipe.model.use_peft:
        model = apply_peft(model, recipe.model, new_tokens, checkpointing_enabled(recipe.sft), log)
    log(trainable_summary(model))
    return model, resized


def build_trainer(recipe: Recipe, model, tokenizer, precision, state, out: Path, data, log=print):
    """TRL's SFTTrainer with ftkit's loss fallback and callbacks; -> (trainer, the NaN guard)."""
    from trl import SFTTrainer

    from ftkit import train_options
    from ftkit.callbacks import NonFiniteLossGuard
    from ftkit.loss import model_accepts_loss_kwargs, token_sum_loss

    config = sft_config(recipe, precision, out, data.eval is not None)
    per_device, accumulation = config.per_device_train_batch_size, config.gradient_accumulation_steps
    log(f"effective batch size: {per_device} per device x {state.num_processes} process(es) x {accumulation} "
        f"accumulation = {per_device * state.num_processes * accumulation}; precision {precision.dtype} weights"
        + (", bf16 mixed" if precision.bf16 else ", fp16 mixed" if precision.fp16 else "") + f" on {precision.device}")
    loss_func = None if model_accepts_loss_kwargs(model) else token_sum_loss
    if loss_func is not None:
        log("note: this model's forward takes no loss kwargs; ftkit normalises the loss by the step's trained tokens")
    loss_guard = NonFiniteLossGuard()
    trainer = SFTTrainer(model=model, args=config, train_dataset=data.train, eval_dataset=data.eval,
                         processing_class=tokenizer, compute_loss_func=loss_func,
                         callbacks=[loss_guard, *train_options.callbacks(recipe)])
    train_options.fix_quantized_trainable_dtype(trainer.model, precision, log)  # TRL casts them to bf16
    return trainer, loss_guard


def write_outputs(trainer, recipe: Recipe, chat_format, stats, result, started: float, resized: bool, precision,
                  samples: list, log=print) -> None:
    from ftkit import artifacts

    out = Path(trainer.args.output_dir)
    sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
    if sharded:  # gathering sharded weights is collective: every process takes part, the main one writes
        trainer.save_model(str(out))
    if not trainer.is_world_process_zero():
        return
    summary = artifacts.write_run(trainer, recipe, chat_format, stats, result, started,
                                  resized=resized, precision=precision, save_model=not sharded)
    if samples:
        summary = eval_samples_after(trainer, recipe, chat_format, samples, summary, log)
    artifacts.print_summary(summary, out, log)
