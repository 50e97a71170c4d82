"""Artifacts stage: everything a run leaves in output_dir, and the summary printed at the end.

output_dir holds: the adapter (or full model) in safetensors, the tokenizer with the exact chat
template used, generation_config.json whose eos ids stop at the end-of-turn token, ftkit_recipe.yml
(resolved, no secrets), ftkit_run.json (what chat/predict/merge need), train_summary.json,
loss_curve.svg, README.md (the model card, train/model_card.py) and train.log (train/display.py).
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import yaml

from ftkit import __version__, rundir
from ftkit.config import quantization
from ftkit.rundir import write_atomic, write_json_atomic
from ftkit.train import options as train_options
from ftkit.train.preference import preference_figures
from ftkit.train.start import start_metadata


def peak_memory_mb() -> float:
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def stop_token_ids(chat_format) -> list[int]:
    tokenizer = chat_format.tokenizer
    return [tokenizer.convert_tokens_to_ids(tok) for tok in chat_format.stop_strings()]


def write_generation_config(model, out: Path, chat_format) -> None:
    """So `ftkit chat`, plain transformers and vLLM all stop at the end-of-turn token."""
    config = model.generation_config
    config.eos_token_id = stop_token_ids(chat_format)
    config.pad_token_id = chat_format.tokenizer.pad_token_id
    config.save_pretrained(out)


def loss_points(log_history: list[dict]) -> tuple[list, list, list, list]:
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    evaluation = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    return [s for s, _ in train], [v for _, v in train], [s for s, _ in evaluation], [v for _, v in evaluation]


def plot_loss(log_history: list[dict], path: Path) -> None:
    """loss_curve.svg: train and eval loss per step, and a preference run's rewards beside them."""
    from ftkit.train.chart import Panel, Series, chart_svg
    from ftkit.train.preference import preference_series

    steps, losses, eval_steps, eval_losses = loss_points(log_history)
    panels = [Panel("loss", "loss", [Series("train loss", list(zip(steps, losses)))])]
    if eval_steps:
        panels[0].series.append(Series("eval loss", list(zip(eval_steps, eval_losses)), markers=True))
    preference = preference_series(log_history)
    if preference:
        panels.append(Panel("preference", "reward", [Series(name, points) for name, points in preference.items()]))
    write_atomic(path, chart_svg(panels))


def save_weights(trainer, out: Path) -> None:
    """The adapter or model, saved under a temporary directory and renamed into place file by file, so a
    kill mid-save leaves no half-written safetensors under a final name."""
    import shutil

    tmp = out / f".ftkit-tmp-save-{os.getpid()}"
    trainer.save_model(str(tmp))
    for item in sorted(tmp.iterdir()):
        target = out / item.name
        if item.name == "README.md":  # PEFT's blank template: ftkit writes the model card (train/model_card.py)
            item.unlink()
            continue
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(item, target)
    tmp.rmdir()


@contextmanager
def readme_kept(out: Path, main: bool = True):
    """A save straight into output_dir (sharded weights) lets PEFT write or update README.md: put back what was
    there (a user's README), or take PEFT's blank template away (the model card follows)."""
    readme = out / "README.md"
    before = readme.read_bytes() if main and readme.is_file() else None
    try:
        yield
    finally:
        if main and before is not None and (not readme.is_file() or readme.read_bytes() != before):
            write_atomic(readme, before)
        elif main and before is None and rundir.is_ftkit_card(readme, blank_template=True):
            readme.unlink()


def run_metadata(recipe, chat_format, model, precision) -> dict:
    """ftkit_run.json: what chat/predict/merge/serve need to load the run as it was trained."""
    return {
        "ftkit_version": __version__,
        "base_model": recipe.model.model_name_or_path,
        "peft": recipe.model.use_peft,
        "load_in_4bit": recipe.model.load_in_4bit,
        "load_in_8bit": recipe.model.load_in_8bit,
        "quantization": quantization.settings(recipe.model),
        "dtype": precision.dtype,
        "embedding_rows": model.get_input_embeddings().weight.shape[0],
        "end_of_turn": chat_format.end_of_turn,
        "trust_remote_code": recipe.model.trust_remote_code,  # chat & co. still need --trust-remote-code
        "system_prompt": recipe.data.system_prompt,  # chat/predict default to it: inference matches training
        "chat_template_kwargs": chat_format.template_kwargs or None,  # every later rendering uses them
        **start_metadata(recipe),  # a run started from another: the base and the adapters merged into it
    }


def write_run(trainer, recipe, chat_format, data_stats, result, started: float, precision,
              save_model: bool = True) -> dict:
    """Everything but the completion marker, each file atomically; -> the summary."""
    out = Path(trainer.args.output_dir)
    if save_model:  # False when every process already took part in saving sharded weights
        save_weights(trainer, out)
    chat_format.tokenizer.save_pretrained(str(out))
    write_generation_config(trainer.model, out, chat_format)
    write_atomic(out / "ftkit_recipe.yml", yaml.safe_dump(recipe.to_dict(), sort_keys=False, allow_unicode=True))
    summary = build_summary(trainer, data_stats, result, started)
    write_json_atomic(out / "train_summary.json", summary)
    plot_loss(trainer.state.log_history, out / "loss_curve.svg")
    return summary


def build_summary(trainer, data_stats, result, started: float) -> dict:
    state, metrics = trainer.state, dict(result.metrics)
    steps, losses, _, eval_losses = loss_points(state.log_history)
    runtime = metrics.get("train_runtime") or (time.time() - started)
    tokens = getattr(state, "num_input_tokens_seen", 0) or 0
    return {
        "global_step": state.global_step,
        "epochs": round(state.epoch or 0, 4),
        "first_train_loss": losses[0] if losses else None,
        "final_train_loss": losses[-1] if losses else None,
        "mean_train_loss": sum(losses) / len(losses) if losses else metrics.get("train_loss"),
        "final_eval_loss": eval_losses[-1] if eval_losses else None,
        **train_options.eval_summary(trainer),  # perplexity per evaluation, best checkpoint, early stop
        "tokens_seen": tokens,
        "trained_tokens_per_epoch": data_stats.trained_tokens,
        "tokens_per_second": round(tokens / runtime, 1) if runtime else None,
        "train_runtime_s": round(runtime, 2),
        "wall_time_s": round(time.time() - started, 2),
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "train_losses": [[step, loss] for step, loss in zip(steps, losses)],
        **preference_figures(state.log_history),  # rewards, margin, accuracy per logged step (preference methods)
        "data": asdict(data_stats),
        "seed": trainer.args.seed,
        "warnings": training_warnings(state.log_history, trainer.model.get_input_embeddings().weight.shape[0],
                                      getattr(trainer.args, "loss_type", "nll")),
    }


def print_summary(summary: dict, out: Path, log=print) -> None:
    loss = summary["final_train_loss"]
    first = summary["first_train_loss"]
    log("")
    for warning in summary.get("warnings") or []:
        log(f"warning: {warning}")
    log(f"{'done, with warnings' if summary.get('warnings') else 'done'}: {summary['global_step']} steps in {summary['train_runtime_s']:.1f}s "
        f"({summary['tokens_per_second'] or 0:,.0f} tokens/s, peak memory {summary['peak_memory_mb']:,.0f} MB)")
    if loss is not None:
        log(f"train loss {first:.4f} -> {loss:.4f}"
            + (f", eval loss {summary['final_eval_loss']:.4f}" if summary["final_eval_loss"] is not None else "")
            + (f" (perplexity {summary['final_eval_perplexity']:.2f})" if summary.get("final_eval_perplexity") else ""))
    if summary.get("final_reward_margin") is not None:
        log(f"reward margin {summary['final_reward_margin']:.4f} (chosen {summary.get('final_rewards_chosen', 0):.4f}, "
            f"rejected {summary.get('final_rewards_rejected', 0):.4f})"
            + (f", pairs ranked right {summary['final_reward_accuracy']:.0%}" if "final_reward_accuracy" in summary else ""))
    if summary.get("early_stopped_at_step"):
        log(f"early stopping ended the run at step {summary['early_stopped_at_step']}; kept the best checkpoint "
            f"{summary.get('best_checkpoint')} (eval loss {summary.get('best_eval_loss', float('nan')):.4f})")
    card = "README.md" if rundir.is_ftkit_card(out / "README.md") else rundir.CARD_ASIDE
    log(f"saved to {out}/ (model card {card}, train.log, train_summary.json, loss_curve.svg)")
    log(f"next: ftkit chat --adapter {out}" if (out / "adapter_config.json").exists() else f"next: ftkit chat --model {out}")


def training_warnings(log_history: list[dict], vocab_size: int, loss_type: str = "nll") -> list[str]:
    """Signs that a run did not learn, for a line after 'done' and train_summary.json: the loss did not fall,
    or it sits at ln(vocab) (uniform guessing) with vanishing gradients, as after a far too high learning rate.
    DFT's loss (-p log p per token) rises while the model gains confidence, so for it the sign is a token
    accuracy that did not rise."""
    logged = [e for e in log_history if "loss" in e]
    if len(logged) < 2:
        return []
    if loss_type == "dft":
        return accuracy_warnings(logged)
    first, last = logged[0]["loss"], logged[-1]["loss"]
    warnings = []
    uniform = math.log(max(vocab_size, 2))
    grad = logged[-1].get("grad_norm")
    if abs(last - uniform) < 0.05 * uniform and (grad is None or grad < 1e-6):
        warnings.append(f"the loss ended at {last:.3f}, about ln(vocabulary) = {uniform:.3f}, with gradient norm "
                        f"{grad if grad is not None else 'unknown'}: the model predicts every token as equally "
                        "likely (diverged); lower learning_rate")
    elif last >= first:
        warnings.append(f"the training loss did not fall ({first:.4f} -> {last:.4f}); check learning_rate and "
                        "the data (ftkit preview)")
    return warnings


def accuracy_warnings(logged: list[dict]) -> list[str]:
    accuracies = [e["mean_token_accuracy"] for e in logged if "mean_token_accuracy" in e]
    if len(accuracies) >= 2 and accuracies[-1] <= accuracies[0]:
        return [f"the token accuracy did not rise ({accuracies[0]:.4f} -> {accuracies[-1]:.4f}); check learning_rate "
                "and the data (ftkit preview)"]
    return []


def write_outputs(trainer, recipe, chat_format, stats, result, started: float, precision, samples: list,
                  log=print, report=None) -> None:
    """All artifacts, then the completion marker last: a kill before it leaves the run 'unfinished'.
    `report` prints the end summary (default: `log`; `--quiet` shows only that)."""
    from ftkit.train.samples import after_training

    out = Path(trainer.args.output_dir)
    sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
    if sharded:  # gathering sharded weights is collective: every process takes part, the main one writes
        with readme_kept(out, trainer.is_world_process_zero()):
            trainer.save_model(str(out))
    if not trainer.is_world_process_zero():
        return
    summary = write_run(trainer, recipe, chat_format, stats, result, started, precision, save_model=not sharded)
    report = report or log
    if samples:
        summary = after_training(trainer, recipe, chat_format, samples, summary, report)
    meta = run_metadata(recipe, chat_format, trainer.model, precision)
    write_model_card(trainer, recipe, summary, meta, log)
    rundir.finish(out, meta)
    print_summary(summary, out, report)


def write_model_card(trainer, recipe, summary: dict, meta: dict, log=print) -> None:
    from ftkit.train.model_card import card, write_card

    params = list(trainer.model.parameters())
    trainable, total = sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
    out = Path(trainer.args.output_dir)
    write_card(out, card(recipe, summary, meta, out, trainable, total, trainer.args.world_size), log)
