"""Loss normalised by the trained tokens of the whole optimizer step.

transformers normalises by the step's token count (`num_items_in_batch`, summed over accumulation
micro-batches and processes) only for models whose forward accepts loss kwargs; for any other model
it averages per micro-batch, so the update depends on how a batch is split. Library gap: for those
models ftkit passes this loss as `compute_loss_func`.
"""

from __future__ import annotations

import inspect


def model_accepts_loss_kwargs(model) -> bool:
    """The same test transformers' Trainer makes, on the model under any PEFT wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "accepts_loss_kwargs"):
        return bool(base.accepts_loss_kwargs)
    return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in inspect.signature(base.forward).parameters.values())


def token_sum_loss(outputs, labels, num_items_in_batch=None):
    """transformers' own causal-LM loss, given the step's token count that the model's forward cannot take
    (without one it is the micro-batch mean: only the per-micro-batch count would be missing)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
    if num_items_in_batch is None:
        num_items_in_batch = (labels[..., 1:] != -100).sum()
    return ForCausalLMLoss(logits, labels, logits.shape[-1], num_items_in_batch=num_items_in_batch)
