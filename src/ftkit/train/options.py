"""Training options that need more than passing a key to SFTConfig: early stopping, evaluation perplexity,
and the dtype of a quantised model's trainable weights. Their recipe checks live in config/checks.py."""

from __future__ import annotations

from ftkit.config.checks import EVAL_STRATEGIES
from ftkit.errors import FtkitError
from ftkit.inference.metrics import perplexity


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
    from ftkit.train.callbacks import EarlyStopping

    return [EarlyStopping(early_stopping_patience=recipe.run.early_stopping_patience,
                          early_stopping_threshold=recipe.run.early_stopping_threshold or 0.0)]


def eval_summary(trainer) -> dict:
    """Eval loss and perplexity per evaluation, the best checkpoint, and whether early stopping ended the run."""
    state = trainer.state
    evals = [(e["step"], e["eval_loss"]) for e in state.log_history if "eval_loss" in e]
    # a preference loss is no token cross-entropy: no perplexity for it
    ppl = perplexity if type(trainer.args).__name__ == "SFTConfig" else (lambda loss: None)
    out: dict = {"final_eval_perplexity": ppl(evals[-1][1]) if evals else None}
    if evals:
        out["eval_losses"] = [[step, loss, ppl(loss)] for step, loss in evals]
    metric = trainer.args.metric_for_best_model
    if trainer.args.load_best_model_at_end and metric in ("loss", "eval_loss") and state.best_metric is not None:
        out["best_eval_loss"] = state.best_metric
        out["best_eval_perplexity"] = ppl(state.best_metric)
        out["best_checkpoint"] = state.best_model_checkpoint
    stopper = next((c for c in trainer.callback_handler.callbacks if hasattr(c, "stopped_at")), None)
    if stopper is not None:
        out["early_stopped_at_step"] = stopper.stopped_at
    return out


def fix_quantized_trainable_dtype(model, precision, log=print) -> int:
    """TRL's SFTTrainer casts every trainable weight of a 4-/8-bit model to bfloat16, whatever the precision:
    on a CPU (float32) or in fp16 training that breaks generation (dtype mismatch in lm_head/embed_tokens
    copies) and rounds the adapter. Cast them to precision.trainable_dtype; -> number of tensors changed."""
    if not (getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)):
        return 0
    import torch

    target = getattr(torch, precision.trainable_dtype)
    changed = 0
    for name, param in model.named_parameters():
        if "lora_magnitude_vector" in name and target != torch.float32:
            continue  # DoRA's magnitude stays float32: its updates can be below bf16's resolution (TRL #7268)
        if param.requires_grad and param.dtype != target and param.dtype.is_floating_point:
            param.data = param.data.to(target)
            changed += 1
    if changed:
        log(f"note: {changed} trainable tensor(s) of the quantised model kept in {precision.trainable_dtype}")
    return changed
