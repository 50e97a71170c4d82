"""Artifacts stage: everything a run leaves in output_dir, and the summary printed at the end.

output_dir holds: the adapter (or full model) in safetensors, the tokenizer with the exact chat
template used, generation_config.json whose eos ids stop at the end-of-turn token, ftkit_recipe.yml
(resolved, no secrets), ftkit_run.json (what chat/predict/merge need), train_summary.json and
loss_curve.png.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import yaml

from ftkit import __version__, train_options

RUN_FILE = "ftkit_run.json"


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses, eval_steps, eval_losses = loss_points(log_history)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, label="train loss")
    if eval_steps:
        ax.plot(eval_steps, eval_losses, "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_run(trainer, recipe, chat_format, data_stats, result, started: float, resized: bool, precision,
              save_model: bool = True) -> dict:
    out = Path(trainer.args.output_dir)
    if save_model:  # False when every process already took part in saving sharded weights
        trainer.save_model(str(out))
    chat_format.tokenizer.save_pretrained(str(out))
    model = trainer.model
    write_generation_config(model, out, chat_format)
    (out / "ftkit_recipe.yml").write_text(
        yaml.safe_dump(recipe.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")
    run = {
        "ftkit_version": __version__,
        "base_model": recipe.model.model_name_or_path,
        "peft": recipe.model.use_peft,
        "load_in_4bit": recipe.model.load_in_4bit,
        "load_in_8bit": recipe.model.load_in_8bit,
        "dtype": precision.dtype,
        "embedding_rows": model.get_input_embeddings().weight.shape[0],
        "end_of_turn": chat_format.end_of_turn,
        "trust_remote_code": recipe.model.trust_remote_code,
        "system_prompt": recipe.data.system_prompt,  # chat/predict default to it: inference matches training
    }
    (out / RUN_FILE).write_text(json.dumps(run, indent=2), encoding="utf-8")
    summary = build_summary(trainer, data_stats, result, started)
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    plot_loss(trainer.state.log_history, out / "loss_curve.png")
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
        "mean_train_loss": metrics.get("train_loss"),
        "final_eval_loss": eval_losses[-1] if eval_losses else None,
        **train_options.eval_summary(trainer),  # perplexity per evaluation, best checkpoint, early stop
        "tokens_seen": tokens,
        "trained_tokens_per_epoch": data_stats.trained_tokens,
        "tokens_per_second": round(tokens / runtime, 1) if runtime else None,
        "train_runtime_s": round(runtime, 2),
        "wall_time_s": round(time.time() - started, 2),
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "train_losses": [[step, loss] for step, loss in zip(steps, losses)],
        "data": asdict(data_stats),
        "seed": trainer.args.seed,
    }


def print_summary(summary: dict, out: Path, log=print) -> None:
    loss = summary["final_train_loss"]
    first = summary["first_train_loss"]
    log("")
    log(f"done: {summary['global_step']} steps in {summary['train_runtime_s']:.1f}s "
        f"({summary['tokens_per_second'] or 0:,.0f} tokens/s, peak memory {summary['peak_memory_mb']:,.0f} MB)")
    if loss is not None:
        log(f"train loss {first:.4f} -> {loss:.4f}"
            + (f", eval loss {summary['final_eval_loss']:.4f}" if summary["final_eval_loss"] is not None else "")
            + (f" (perplexity {summary['final_eval_perplexity']:.2f})" if summary.get("final_eval_perplexity") else ""))
    if summary.get("early_stopped_at_step"):
        log(f"early stopping ended the run at step {summary['early_stopped_at_step']}; kept the best checkpoint "
            f"{summary.get('best_checkpoint')} (eval loss {summary.get('best_eval_loss', float('nan')):.4f})")
    log(f"saved to {out}/ (train_summary.json, loss_curve.png, ftkit_recipe.yml)")
    log(f"next: ftkit chat --adapter {out}" if (out / "adapter_config.json").exists() else f"next: ftkit chat --model {out}")
