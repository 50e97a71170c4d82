"""Training options that need more than passing a key to SFTConfig: early stopping, attention kernels that
keep packed sequences apart, evaluation perplexity, and the dtype of a quantised model's trainable weights.

Nothing here imports torch at module level: recipe checks call into it.
"""

from __future__ import annotations

import math

from ftkit.errors import FtkitError

# Attention kernels that separate packed sequences by their position_ids (varlen flash attention). eager and
# sdpa do not: measured with transformers 5.23, a packed batch without an attention mask lets the second
# sequence attend to the first (tests/test_modes.py checks this still holds).
PACKING_SAFE_ATTENTION = ("flash_attention_2", "flash_attention_3", "flash_attention_4")
EVAL_STRATEGIES = ("steps", "epoch")


def packing_attention_ok(attn_implementation: str | None) -> bool:
    """flash_attention_2/3/4, or a kernels-hub flash kernel (e.g. kernels-community/flash-attn3)."""
    impl = attn_implementation or "sdpa"  # transformers' default
    return impl in PACKING_SAFE_ATTENTION or ("/" in impl and "flash" in impl.lower())


def check(recipe) -> list[tuple[str, str]]:
    """Cross-key problems of the options in this module, as (key, message) pairs for recipe_checks."""
    s, problems = recipe.sft, []
    packed = [key for key in ("packing", "padding_free") if s.get(key)]
    attn = recipe.model.attn_implementation
    if packed and not packing_attention_ok(attn):
        problems.append((packed[0], f"{packed[0]}: true puts several samples in one row, and attn_implementation "
                         f"'{attn or 'sdpa (default)'}' would let them attend to each other; use "
                         "attn_implementation: flash_attention_2 (pip install flash-attn, CUDA GPU) or "
                         f"set {packed[0]}: false"))
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


def apply(recipe, args: dict, log=print) -> dict:
    """Adjust the SFTConfig arguments for the options above (called by train.sft_config)."""
    if recipe.run.early_stopping_patience is None:
        return args
    if args.get("eval_strategy", "no") not in EVAL_STRATEGIES:  # recipe checks refuse this; --set could not
        raise FtkitError("early_stopping_patience needs eval_strategy: steps or epoch")
    if not args.get("load_best_model_at_end"):
        args["load_best_model_at_end"] = True
        log("note: early_stopping_patience: load_best_model_at_end set to true (the best checkpoint is kept)")
    args.setdefault("metric_for_best_model", "eval_loss")
    if "save_strategy" not in args:
        args["save_strategy"] = args["eval_strategy"]
        if args["eval_strategy"] == "steps":
            args["save_steps"] = args.get("eval_steps") or args.get("logging_steps") or 500
        log(f"note: early_stopping_patience: checkpoints are saved at every evaluation (save_strategy "
            f"{args['save_strategy']}) so the best one can be restored")
    return args


def callbacks(recipe) -> list:
    """Trainer callbacks the recipe asks for."""
    if recipe.run.early_stopping_patience is None:
        return []
    from ftkit.callbacks import EarlyStopping

    return [EarlyStopping(early_stopping_patience=recipe.run.early_stopping_patience,
                          early_stopping_threshold=recipe.run.early_stopping_threshold or 0.0)]


def perplexity(loss: float | None) -> float | None:
    """exp(mean token cross-entropy); None when there is no loss or it would overflow."""
    if loss is None or not math.isfinite(loss) or loss > 700:
        return None
    return round(math.exp(loss), 4)


def eval_summary(trainer) -> dict:
    """Eval loss and perplexity per evaluation, the best checkpoint, and whether early stopping ended the run."""
    state = trainer.state
    evals = [(e["step"], e["eval_loss"]) for e in state.log_history if "eval_loss" in e]
    out: dict = {"final_eval_perplexity": perplexity(evals[-1][1]) if evals else None}
    if evals:
        out["eval_losses"] = [[step, loss, perplexity(loss)] for step, loss in evals]
    metric = trainer.args.metric_for_best_model
    if trainer.args.load_best_model_at_end and metric in ("loss", "eval_loss") and state.best_metric is not None:
        out["best_eval_loss"] = state.best_metric
        out["best_eval_perplexity"] = perplexity(state.best_metric)
        out["best_checkpoint"] = state.best_model_checkpoint
    stopper = next((c for c in trainer.callback_handler.callbacks if hasattr(c, "stopped_at")), None)
    if stopper is not None:
        out["early_stopped_at_step"] = stopper.stopped_at
    return out


def trainable_dtype(precision) -> str:
    """dtype of a quantised model's trainable weights (LoRA A/B, modules_to_save): the 4-bit compute dtype when
    training in bf16, else float32 (fp16 AMP cannot unscale fp16/bf16 master weights; a CPU computes in fp32)."""
    if precision.device == "cuda" and precision.bf16 and precision.compute_dtype == "bfloat16":
        return "bfloat16"
    return "float32"


def fix_quantized_trainable_dtype(model, precision, log=print) -> int:
    """TRL's SFTTrainer casts every trainable weight of a 4-/8-bit model to bfloat16, whatever the precision:
    on a CPU (float32) or in fp16 training that breaks generation (dtype mismatch in lm_head/embed_tokens
    copies) and rounds the adapter. Cast them to trainable_dtype(); -> number of tensors changed."""
    if not (getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)):
        return 0
    import torch

    target = getattr(torch, trainable_dtype(precision))
    changed = 0
    for name, param in model.named_parameters():
        if "lora_magnitude_vector" in name and target != torch.float32:
            continue  # DoRA's magnitude stays float32: its updates can be below bf16's resolution (TRL #7268)
        if param.requires_grad and param.dtype != target and param.dtype.is_floating_point:
            param.data = param.data.to(target)
            changed += 1
    if changed:
        log(f"note: {changed} trainable tensor(s) of the quantised model kept in {trainable_dtype(precision)}")
    return changed
