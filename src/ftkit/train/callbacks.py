"""Trainer callbacks ftkit adds to a run (imported only by training: it imports transformers).

NonFiniteLossGuard: a NaN or infinite training loss ends the run at once with an actionable message,
instead of training on for hours and saving a broken model as if it had finished (the field notes: none
of axolotl, LLaMA-Factory, alignment-handbook or `trl sft` stops on it).
DisplayCallback: the run's progress on ftkit's display (train/display.py) instead of transformers' tqdm bar
and raw log dicts.
"""

from __future__ import annotations

import math
import time

from transformers import EarlyStoppingCallback, TrainerCallback
from transformers.trainer_utils import has_length


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


class DisplayCallback(TrainerCallback):
    """ftkit's progress display in place of transformers' ProgressCallback (a tqdm bar with the raw log dict
    written under it) and PrinterCallback (the dict printed): numbers as numbers, one line per logging step,
    or the live display in a terminal. Only the main process shows anything."""

    SHOWN = {"loss", "grad_norm", "learning_rate", "epoch"}
    NOT_SHOWN = {"total_flos", "num_input_tokens_seen", "train_runtime", "train_tokens_per_second"}

    def __init__(self, display, smoothing: float = 0.5):
        self.display, self.smoothing = display, smoothing
        self.started = self.last_time = 0.0
        self.first_step = self.last_tokens = 0
        self.smoothed: float | None = None
        self.predicted = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.started = self.last_time = time.time()
            self.first_step, self.last_tokens = state.global_step, state.num_input_tokens_seen or 0
            self.display.start_training(state.max_steps)
            self.display.advance(state.global_step, state.epoch, 0.0, None)

    def timing(self, state) -> tuple[float, float | None]:
        """-> (seconds since this process started training, seconds left at the rate so far)."""
        elapsed = time.time() - self.started
        done = state.global_step - self.first_step
        return elapsed, (elapsed / done * (state.max_steps - state.global_step) if done > 0 else None)

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.display.advance(state.global_step, state.epoch, *self.timing(state))

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if state.is_world_process_zero:
            self.predicted += 1
            total = len(eval_dataloader) if has_length(eval_dataloader) else 0  # a streamed eval set has none
            self.display.set_detail(f"evaluating {self.predicted}/{total}" if total else "evaluating")

    def on_evaluate(self, args, state, control, **kwargs):
        self.predicted = 0
        self.display.set_detail("")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs:
            self.display.step(self.report(state, logs))
        elif "eval_loss" in logs:
            self.display.evaluation(self.eval_line(state, logs))

    def report(self, state, logs: dict):
        from ftkit.train.artifacts import peak_memory_mb
        from ftkit.train.step_lines import StepReport

        loss = float(logs["loss"])
        if math.isfinite(loss):
            self.smoothed = loss if self.smoothed is None else self.smoothing * loss + (1 - self.smoothing) * self.smoothed
        now, tokens = time.time(), state.num_input_tokens_seen or 0
        rate = (tokens - self.last_tokens) / (now - self.last_time) if tokens and now > self.last_time else None
        self.last_time, self.last_tokens = now, tokens
        elapsed, eta = self.timing(state)
        extra = {} if self.display.level != "verbose" else {
            k: float(v) for k, v in logs.items()
            if k not in self.SHOWN | self.NOT_SHOWN and isinstance(v, (int, float)) and not isinstance(v, bool)}
        return StepReport(step=state.global_step, total=state.max_steps, epoch=state.epoch, loss=loss,
                          smoothed_loss=self.smoothed, learning_rate=logs.get("learning_rate"),
                          grad_norm=logs.get("grad_norm"), tokens_per_second=rate,
                          memory_gb=peak_memory_mb() / 1024, elapsed=elapsed, eta=eta, extra=extra)

    def eval_line(self, state, logs: dict) -> str:
        from ftkit.train.step_lines import eval_line
        from ftkit.inference.metrics import perplexity

        metrics = {"eval_loss": float(logs["eval_loss"])}
        if perplexity(metrics["eval_loss"]) is not None:
            metrics["perplexity"] = perplexity(metrics["eval_loss"])
        if self.display.level == "verbose":
            metrics.update({k: float(v) for k, v in logs.items() if k.startswith("eval_") and k != "eval_loss"
                            and isinstance(v, (int, float)) and not isinstance(v, bool)})
        return eval_line(state.global_step, state.max_steps, metrics)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.display.end_training()


def replace_progress_callbacks(trainer, display) -> None:
    """transformers' own progress printing out, ftkit's display in."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for cls in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(cls)
    trainer.add_callback(DisplayCallback(display))
