"""Loss normalised by the trained tokens of the whole optimizer step, for every model.

TRL's SFTTrainer computes the loss itself (its fused LM head: summed over trained tokens, divided by the step's
token count `num_items_in_batch`) and never passes loss kwargs to the model's forward. transformers' Trainer only
counts `num_items_in_batch` across accumulation micro-batches, and only skips its own per-micro-batch division,
when it believes the model's forward accepts loss kwargs; for any other model the update would depend on how a
batch is split. Library gap: ftkit tells the Trainer that the step's token count is used. (Passing a
`compute_loss_func` instead, as ftkit did before, makes TRL run a second forward every step for its metrics.)
"""

from __future__ import annotations


def count_step_tokens(trainer) -> bool:
    """Make the Trainer count the step's trained tokens for TRL's loss; -> whether it had to be told."""
    if trainer.model_accepts_loss_kwargs:
        return False
    trainer.model_accepts_loss_kwargs = True
    return True
