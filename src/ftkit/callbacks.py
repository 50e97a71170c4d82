"""Trainer callbacks ftkit adds to a run (imported only by training: it imports transformers).

NonFiniteLossGuard: a NaN or infinite training loss ends the run at once with an actionable message,
instead of training on for hours and saving a broken model as if it had finished (the field notes: none
of axolotl, LLaMA-Factory, alignment-handbook or `trl sft` stops on it).
"""

from __future__ import annotations

import math

from transformers import EarlyStoppingCallback, TrainerCallback


class NonFiniteLossGuard(TrainerCallback):
    def __init__(self):
        self.bad_step: int | None = None
        self.bad_value: float | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.bad_step, self.bad_value = state.global_step, float(loss)
            control.should_training_stop = True
        return control

    def message(self) -> str:
        return (f"training loss became {self.bad_value} at step {self.bad_step}; stopped, and no model was saved. "
                "Lower learning_rate, set max_grad_norm (e.g. 1.0), or train in float32/bf16 instead of fp16")


class EarlyStopping(EarlyStoppingCallback):
    """transformers' callback, remembering at which step it stopped so the summary can say so."""

    stopped_at: int | None = None

    def on_evaluate(self, args, state, control, metrics, **kwargs):
        super().on_evaluate(args, state, control, metrics, **kwargs)
        if control.should_training_stop and self.stopped_at is None:
            self.stopped_at = state.global_step
