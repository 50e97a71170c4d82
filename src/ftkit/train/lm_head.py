"""On a CPU, the SFT loss from materialised logits instead of TRL's fused LM head.

SFTTrainer patches the model so that its loss comes from a fused LM head: log-probs in chunks without the full
logits, the projection recomputed in backward. That saves GPU memory; on a CPU (no Triton, so every position is
scored) the same step took 1.7-2.2x the time of the model's own loss over materialised logits (bench/lm_head.py),
which is what transformers' Trainer, and axolotl's trainer built on it, run. Library gap: TRL has no switch for
it. This returns the fields TRL's compute_loss reads (loss, log-probs, entropy, top-1 flags, label mask) from the
materialised logits, so its loss types, metrics and token counts run unchanged. A batch whose logits would pass
LOGITS_BYTES, a shifted-label call, or a model whose head scales or caps its logits keeps TRL's fused head.
"""

from __future__ import annotations

import types

LOGITS_BYTES = 512 * 2**20  # float32 logits of one call; the step holds about three times this at its peak
SCALED_HEAD = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def use_materialised_head(trainer, device: str, log=print) -> bool:
    """Route the SFT trainer's fused-head calls through materialised logits on a CPU; -> whether it did."""
    from peft import PeftModel

    model = trainer.model.get_base_model() if isinstance(trainer.model, PeftModel) else trainer.model
    text_config = model.config.get_text_config()
    if device != "cpu" or getattr(text_config, "output_router_logits", False):
        return False
    if any(getattr(text_config, name, None) is not None for name in SCALED_HEAD):
        return False
    fused_forward = model.forward  # TRL's patch, kept for the calls this does not take
    model.forward = types.MethodType(materialised_forward(fused_forward, text_config.vocab_size), model)
    log("note: the loss is computed from full logits, faster than TRL's fused LM head on a CPU")
    return True


def materialised_forward(fused_forward, vocab_size: int):
    """A forward with TRL's fused-head signature that computes the same outputs from the logits."""

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                **kwargs):
        tokens = labels.numel() if labels is not None else 0
        if not fused_lm_head or labels is None or shift_labels is not None or tokens * vocab_size * 4 > LOGITS_BYTES:
            return fused_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                                 num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        logits = fused_forward(*args, **kwargs).logits[:, :-1]  # TRL's patch calls the model's own forward
        return head_outputs(logits, labels[:, 1:].to(logits.device), num_items_in_batch)

    return forward


def head_outputs(logits, labels, num_items_in_batch=None):
    """TRL's FusedCausalLMOutput from next-token logits and their labels (-100 ignored)."""
    import torch
    from trl.trainer.utils import FusedCausalLMOutput

    mask = labels != -100
    all_log_probs = torch.log_softmax(logits.float(), dim=-1)
    log_probs = all_log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(~mask, 0.0)
    with torch.no_grad():
        detached = all_log_probs.detach()
        entropy = -(detached.exp() * detached).sum(-1).masked_fill(~mask, 0.0)
        is_top1 = (detached.argmax(-1) == labels) & mask
    count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return FusedCausalLMOutput(loss=-log_probs.sum() / count, log_probs=log_probs, entropy=entropy, is_top1=is_top1,
                               label_mask=mask)
