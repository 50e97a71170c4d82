"""Train stage: recipe -> data -> model -> TRL's SFTTrainer -> artifacts in output_dir.

Read top to bottom: `run_training` wraps the run in its display and train.log, `train` checks and prepares,
`train_stages` is the whole run; each function below it is one stage.
"""

from __future__ import annotations

import time
from pathlib import Path

from ftkit import __version__, rundir
from ftkit.config.schema import Recipe
from ftkit.errors import FtkitError, Interrupted


def run_training(recipe: Recipe, use_cache: bool = True, log=print, recipe_path: Path | None = None,
                 display=None) -> Path:
    """recipe -> data -> model -> SFTTrainer -> artifacts in output_dir. -> output_dir.
    `display` (train/display.py) shows and records the run; without one, lines go to `log` and train.log."""
    from ftkit.dist import is_main_process
    from ftkit.train.display import RunDisplay

    if display is None or not is_main_process():  # every rank meets the same notes: rank 0 alone shows them
        display = RunDisplay(live=False, echo=log if is_main_process() else (lambda *_args: None))
    try:
        return train(recipe, use_cache, recipe_path, display)
    except BaseException as err:
        display.failed(err)
        raise
    finally:
        display.close()


def train(recipe: Recipe, use_cache: bool, recipe_path: Path | None, display) -> Path:
    from ftkit.dist import is_main_process

    started = time.time()
    out = recipe.output_dir()
    resume = recipe.sft.get("resume_from_checkpoint")
    action = rundir.plan_training_dir(out, recipe.run.overwrite_output_dir, resume)  # before anything loads
    if action == "resume" and is_main_process():  # the run directory is ftkit's already: log into it from the start
        display.attach_log(out / "train.log", log_header(recipe))
    from ftkit.config.launch_plan import check_launch, plan_from_environment

    check_launch(recipe, plan_from_environment())  # when `accelerate launch` started us without ftkit's launcher
    log = display
    from ftkit.train.args import setup_reporting

    setup_reporting(recipe, out, log)
    from ftkit.config.sources import sources_from_recipe
    from ftkit.hub import prepare_hub_access

    prepare_hub_access([recipe.model.model_name_or_path, recipe.model.tokenizer_name_or_path,
                        *(s.path for s in sources_from_recipe(recipe.data))], log)
    from ftkit.train.library_output import library_output

    with library_output(display):
        return train_stages(recipe, use_cache, recipe_path, display, out, action, resume, started)


def train_stages(recipe: Recipe, use_cache: bool, recipe_path: Path | None, display, out: Path, action: str, resume,
                 started: float) -> Path:
    import torch
    from accelerate import PartialState

    from ftkit.config.checks import check_for_device
    from ftkit.config.precision import detect_hardware, training_precision
    from ftkit.train.samples import before_training
    from ftkit.train.start import check_start, copy_chain

    check_start(recipe)
    log = display
    precision = training_precision(recipe.model, recipe.sft, detect_hardware(bool(recipe.sft.get("use_cpu"))))
    check_for_device(recipe, precision.device)
    if precision.note:
        log(f"note: {precision.note}")
    # cpu=True on CPU: otherwise accelerate sees a single process there and main_process_first() waits for nobody
    state = PartialState(cpu=precision.device == "cpu")
    torch.manual_seed(recipe.sft_value("seed"))
    tokenizer, chat_format, added, data = load_data(recipe, state, use_cache, display)
    display.phase(f"loading model {recipe.model.model_name_or_path}")
    model = prepare_model(recipe, precision, tokenizer, bool(added), data, state.local_process_index, log, out)
    lora = trainer_lora(model, recipe, bool(added), log)
    if state.is_main_process:
        open_run_dir(out, action, log)
        copy_chain(recipe, out)
        display.attach_log(out / "train.log", log_header(recipe))
    state.wait_for_everyone()
    display.phase("preparing the trainer")
    trainer, loss_guard, interrupt = build_trainer(recipe, model, tokenizer, precision, state, out, data, log, lora,
                                                   display)
    if data.eval_conversations and recipe.run.eval_samples != 0:
        display.phase("answering eval prompts before training")
    samples = before_training(trainer, recipe, chat_format, data.eval_conversations, state, log)
    checkpoint = resume_point(out, resume, log)
    if state.num_processes == 1:
        interrupt.install()
    try:
        result = trainer.train(resume_from_checkpoint=checkpoint)
    finally:
        interrupt.restore()
    if loss_guard.bad_step is not None:
        raise FtkitError(loss_guard.message())
    if interrupt.requested:
        raise Interrupted(*interrupted_lines(out, recipe_path))
    from ftkit.train.artifacts import write_outputs

    display.phase("saving" + (" and answering eval prompts after training" if samples else ""))
    write_outputs(trainer, recipe, chat_format, data.stats, result, started, precision, samples, log,
                  report=display.summary)
    return out


def load_data(recipe: Recipe, state, use_cache: bool, display):
    """The tokenizer with the template's tokens, then the tokenised data (rank 0 first, the others reuse its
    cache); -> (tokenizer, chat format, tokens added, datasets)."""
    from ftkit.data.pipeline import build_datasets
    from ftkit.train.model import load_tokenizer

    if recipe.method != "sft":
        from ftkit.data.preference import build_preference_datasets as build_datasets

    display.phase(f"loading tokenizer {recipe.model.tokenizer_name_or_path or recipe.model.model_name_or_path}")
    tokenizer, chat_format, added = load_tokenizer(recipe.model, recipe.data.chat_template, display,
                                                   recipe.data.chat_template_kwargs)
    display.phase("preparing data (reading, tokenising)")
    with state.main_process_first():
        data = build_datasets(recipe, chat_format, use_cache, display)
    return tokenizer, chat_format, added, data


def log_header(recipe: Recipe) -> str:
    return f"ftkit {__version__} train {recipe.path or '(a recipe given in code)'}"


def open_run_dir(out: Path, action: str, log=print) -> None:
    """Clear an old run that the recipe replaces, then mark the directory as ftkit's before training writes."""
    if action == "overwrite" and rundir.state(out) in ("finished", "unfinished"):  # never a foreign folder's files
        removed = rundir.clear_run(out)
        if removed:
            log(f"note: overwrite_output_dir: removed the earlier run's files from {out} ({len(removed)} entries; "
                "files ftkit did not write were kept)")
    if not (out / rundir.OWNER).is_file():
        rundir.claim(out, "run")


def resume_point(out: Path, resume, log=print) -> str | None:
    """resume_from_checkpoint: true -> the newest complete checkpoint; a path as given; else None."""
    if not resume:
        return None
    checkpoint = Path(resume) if isinstance(resume, str) else rundir.latest_checkpoint(out)
    log(f"resuming from {checkpoint} (optimizer, scheduler and data order restored)")
    return str(checkpoint)


def interrupted_lines(out: Path, recipe_path: Path | None) -> list[str]:
    newest = rundir.latest_checkpoint(out)
    command = f"ftkit train {recipe_path or 'RECIPE'} --resume"
    if newest is None:
        return ["stopped before a checkpoint could be saved; nothing to resume, train again to start over"]
    return [f"stopped; saved {newest}", f"continue with: {command}"]


def data_summary(stats) -> str:
    share = 100 * stats.trained_tokens / max(stats.tokens, 1)
    parts = [f"data: {stats.train_rows:,} train / {stats.eval_rows:,} eval samples",
             f"{stats.trained_tokens:,} of {stats.tokens:,} tokens carry loss ({share:.0f}%)"]
    if stats.split_conversations:
        parts.append(f"{stats.split_conversations} conversations trained as one sample per assistant turn (the chat "
                     "template rewrites earlier turns; see ftkit preview)")
    if stats.unrendered_turns:
        parts.append(f"{stats.unrendered_turns} assistant turns lose text the chat template does not render (see "
                     "ftkit preview)")
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


def prepare_model(recipe: Recipe, precision, tokenizer, new_tokens: bool, data, device_index: int, log=print,
                  out: Path | None = None):
    """The model loaded (a finished run's model when the recipe starts from one), its embeddings fitted to the
    tokenizer, every token id checked, ftkit's defaults decided, PEFT applied (DPO and KTO apply it themselves:
    trainer_lora)."""
    from ftkit.train.defaults import choose_padding_free, resolve_checkpointing
    from ftkit.train.model import apply_peft, fit_embeddings, prepare_kbit, trainable_summary
    from ftkit.train.packing import check_packing
    from ftkit.train.start import load_policy
    from ftkit.train.varlen import use_varlen

    model = load_policy(recipe, precision, device_index, out or recipe.output_dir(), log)
    fit_embeddings(model, tokenizer, log)
    if not recipe.data.streaming:  # a stream cannot be scanned ahead; fit_embeddings still bounds every id
        check_token_ids(data.train, model, data.stats.max_token_id)
        log(data_summary(data.stats))
    checkpointing = resolve_checkpointing(model, recipe, precision, device_index, log)
    if recipe.method in ("dpo", "kto") and recipe.model.use_peft:  # TRL wraps it: the reference is the adapter off
        return prepare_kbit(model, recipe.model, checkpointing)
    if recipe.model.use_peft:
        model = apply_peft(model, recipe.model, new_tokens, checkpointing, log)
    log(trainable_summary(model))
    if recipe.method == "sft":
        check_packing(model, recipe, log)  # before the run directory is claimed
        choose_padding_free(model, recipe, log)
        use_varlen(model, recipe, log)
    return model


def trainer_lora(model, recipe: Recipe, new_tokens: bool, log=print):
    """The LoRA config DPO and KTO apply themselves, so their reference is the model with the adapter off."""
    if recipe.method not in ("dpo", "kto") or not recipe.model.use_peft:
        return None
    from ftkit.train.model import lora_config

    return lora_config(model, recipe.model, new_tokens, log)


def build_trainer(recipe: Recipe, model, tokenizer, precision, state, out: Path, data, log=print, lora=None,
                  display=None):
    """TRL's SFTTrainer (or the method's preference trainer) with ftkit's callbacks, its progress shown on
    `display` (when given) instead of transformers' bar; -> (trainer, NaN guard, Ctrl-C handler)."""
    from trl import SFTTrainer

    from ftkit.train import options as train_options
    from ftkit.train.args import sft_config
    from ftkit.train.callbacks import InterruptCheckpoint, NonFiniteLossGuard, replace_progress_callbacks
    from ftkit.train.lm_head import use_materialised_head
    from ftkit.train.loss import count_step_tokens

    loss_guard, interrupt = NonFiniteLossGuard(), InterruptCheckpoint()
    callbacks = [loss_guard, interrupt, *train_options.callbacks(recipe)]
    if recipe.method != "sft":
        from ftkit.train.model import trainable_summary
        from ftkit.train.preference import build_preference_trainer

        trainer = build_preference_trainer(recipe, model, tokenizer, precision, out, data, lora, callbacks, log)
        if lora is not None:
            log(trainable_summary(trainer.model))
    else:
        trainer = SFTTrainer(model=model, args=sft_config(recipe, precision, out, data.eval is not None),
                             train_dataset=data.train, eval_dataset=data.eval, processing_class=tokenizer,
                             callbacks=callbacks)
    config = trainer.args
    per_device, accumulation = config.per_device_train_batch_size, config.gradient_accumulation_steps
    log(f"effective batch size: {per_device} per device x {state.num_processes} process(es) x {accumulation} "
        f"accumulation = {per_device * state.num_processes * accumulation}; precision {precision.dtype} weights"
        + (", bf16 mixed" if precision.bf16 else ", fp16 mixed" if precision.fp16 else "") + f" on {precision.device}")
    if display is not None:
        replace_progress_callbacks(trainer, display)
    # ftkit writes the model card (train/model_card.py); TRL's trainers write theirs into output_dir/README.md at
    # every checkpoint, over a user's README.md and over ftkit's card
    trainer.create_model_card = lambda *args, **kwargs: None
    train_options.fix_quantized_trainable_dtype(trainer.model, precision, log)  # TRL casts them to bf16
    if recipe.method == "sft" and count_step_tokens(trainer):
        log("note: this model's forward takes no loss kwargs; ftkit normalises the loss by the step's trained tokens")
    if recipe.method == "sft":
        use_materialised_head(trainer, precision.device, log)
    return trainer, loss_guard, interrupt
