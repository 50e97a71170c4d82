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


class InterruptCheckpoint(TrainerCallback):
    """The first Ctrl-C (or SIGTERM) asks the trainer to save a checkpoint at the end of the current step and
    stop, so the run can be resumed; a second one exits at once. Single-process runs only: ranks that saw the
    signal at different steps would disagree on when to save."""

    def __init__(self):
        self.requested = False
        self.previous: dict = {}

    def _handle(self, signum, _frame):
        import signal
        import sys

        if self.requested:  # the second signal: leave now
            self.restore()
            raise KeyboardInterrupt
        self.requested = True
        name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        print(f"\nftkit: {name}: saving a checkpoint after this step, then stopping (Ctrl-C again to quit "
              "without saving)", file=sys.stderr, flush=True)

    def install(self) -> None:
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        import signal

        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True
        return control
