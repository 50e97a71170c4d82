"""What a training run shows, and output_dir/train.log, which records all of it.

In a terminal: one rich live display, the current phase with a spinner (loading the tokenizer, preparing the
data, loading the model with its weights counted, ...), then a progress bar with step/total, epoch, smoothed
and last loss, learning rate, gradient norm, tokens/s, elapsed time, ETA and memory. ftkit's own lines and
eval results are printed above it. Anywhere else (CI, `| tee`, a cluster log) the same lines are printed
plainly, with one line per logging step made to be parsed (`step_line`).

Levels: quiet (the final summary only; errors are printed by the CLI), normal, verbose (every library message
too). At every level train.log gets each line, each step line and every library message, prefixed with the
time, written through line by line so that a crash leaves the log up to its last line.
"""

from __future__ import annotations

import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

LEVELS = ("quiet", "normal", "verbose")


@dataclass
class StepReport:
    """One logging step, as the display shows it."""
    step: int
    total: int
    epoch: float | None = None
    loss: float | None = None
    smoothed_loss: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    tokens_per_second: float | None = None
    memory_gb: float | None = None
    elapsed: float = 0.0
    eta: float | None = None
    extra: dict = field(default_factory=dict)  # other logged numbers (entropy, accuracy, ...): verbose lines


def duration(seconds: float) -> str:
    """45s, 1m02s, 3h07m09s."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def scientific(value: float) -> str:
    """2.0e-4 (Python writes 2.0e-04): a learning rate as people write it, still a float to parsers."""
    return re.sub(r"e([+-])0*(\d)", lambda m: f"e{'' if m.group(1) == '+' else '-'}{m.group(2)}", f"{value:.1e}")


def number(value: float) -> str:
    """Four significant digits, no thousands separator: float() reads it back."""
    return f"{value:.4g}"


def step_line(report: StepReport) -> str:
    """The plain line of one logging step: `step S/T` then `name value` pairs, one space apart, each value a
    number float() reads (durations excepted: elapsed and eta read like 1m02s), fields without a value left out:

        step 120/400 epoch 1.5 loss 0.532 lr 2.0e-4 grad_norm 0.81 tok/s 4410 mem_gb 5.1 elapsed 31s eta 1m02s
    """
    parts = [f"step {report.step}/{report.total}"]
    pairs = [("epoch", report.epoch, lambda v: f"{v:.4g}"), ("loss", report.loss, number),
             ("lr", report.learning_rate, scientific), ("grad_norm", report.grad_norm, number),
             ("tok/s", report.tokens_per_second, lambda v: f"{v:.0f}"), ("mem_gb", report.memory_gb, lambda v: f"{v:.1f}")]
    parts += [f"{name} {fmt(value)}" for name, value, fmt in pairs if value is not None]
    parts += [f"{name} {number(value)}" for name, value in report.extra.items()]
    parts.append(f"elapsed {duration(report.elapsed)}")
    if report.eta is not None:
        parts.append(f"eta {duration(report.eta)}")
    return " ".join(parts)


def eval_line(step: int, total: int, metrics: dict[str, float]) -> str:
    """`eval step S/T loss 0.61 perplexity 1.84 ...`: the evaluation's numbers without their eval_ prefix."""
    pairs = " ".join(f"{name.removeprefix('eval_')} {number(value)}" for name, value in metrics.items())
    return f"eval step {step}/{total} {pairs}".rstrip()


class RunDisplay:
    """The run's screen and its log file. Called with a line, it is a `log` function like print."""

    def __init__(self, level: str = "normal", live: bool | None = None, echo: Callable[[str], None] | None = None,
                 stream: TextIO | None = None):
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}")
        self.level = level
        self.stream = stream or sys.stdout
        self.live_mode = (is_terminal(self.stream) if live is None else live) and level != "quiet"
        self.echo = echo or self._print
        self.file: TextIO | None = None
        self.pending: list[str] = []  # lines recorded before the run directory could take them
        self.shown_warnings: set[str] = set()
        self.phase_text, self.detail = "", ""
        self.report: StepReport | None = None
        self.training = self.finished = self.summarising = False
        self._live = None
        self._console = None
        self.spinner = None  # the live view's, kept from frame to frame
        self.created = time.time()

    # ---------------------------------------------------------------- lines
    def __call__(self, message: object = "") -> None:
        """An ftkit line (a note, the data summary, ...): shown unless quiet, always recorded."""
        self.record(str(message))
        if self.level != "quiet":
            self.show(str(message))

    def summary(self, message: object = "") -> None:
        """A line of the final summary: shown at every level, after the live display has stopped."""
        self.summarising = True
        self.stop_live()
        self.record(str(message))
        self.show(str(message))

    def warn_once(self, message: str, full: str | None = None) -> None:
        """A library warning: recorded every time (`full`, when given), its line shown once (not when quiet)."""
        self.record(f"warning: {full or message}")
        if self.level != "quiet" and message not in self.shown_warnings:
            self.shown_warnings.add(message)
            self.show(f"warning: {message}")

    def library(self, text: str) -> None:
        """A library message that is only recorded (shown too when verbose)."""
        self.record(text)
        if self.level == "verbose":
            self.show(text)

    def show(self, message: str) -> None:
        if self.live_mode and self.console is not None and not self.summarising:
            self.console.print(message, markup=False, highlight=False, emoji=False)
        else:
            self.echo(message)

    def _print(self, message: str) -> None:
        print(message, file=self.stream, flush=True)

    # ---------------------------------------------------------------- phases and steps
    def phase(self, text: str, detail: str = "") -> None:
        """What the run is doing now: the spinner's text in a terminal, a line elsewhere."""
        if text == self.phase_text:
            return
        self.phase_text, self.detail = text, detail
        self.record(f"[{text}]")
        if self.live_mode:
            self.start_live()
        elif self.level != "quiet":
            self.echo(f"[{text}]")

    def set_detail(self, detail: str) -> None:
        """Progress within the phase (weights loaded, eval batches): shown live only."""
        self.detail = detail

    def start_training(self, total: int) -> None:
        self.training, self.report = True, StepReport(step=0, total=total)
        self.phase("training")

    def advance(self, step: int, epoch: float | None, elapsed: float, eta: float | None) -> None:
        """Every optimizer step: keeps the live bar, elapsed time and ETA moving between logging steps."""
        if self.report is not None:
            self.report.step, self.report.epoch, self.report.elapsed, self.report.eta = step, epoch, elapsed, eta

    def step(self, report: StepReport) -> None:
        """A logging step: one plain line (recorded always, printed when not live), the live display updated."""
        self.report = report
        line = step_line(report)
        self.record(line)
        if not self.live_mode and self.level != "quiet":
            self.echo(line)

    def evaluation(self, line: str) -> None:
        self(line)

    def end_training(self) -> None:
        self.finished = True
        self.detail = ""

    # ---------------------------------------------------------------- train.log
    def record(self, line: str) -> None:
        stamped = [f"{time.strftime('%H:%M:%S')} {part}" for part in line.split("\n")]
        if self.file is None:
            self.pending.extend(stamped)
            return
        self.file.write("\n".join(stamped) + "\n")

    def attach_log(self, path: Path, header: str) -> None:
        """Start writing train.log (appending: a resumed run continues its log) with what was recorded so far."""
        if self.file is not None:
            return
        self.file = open(path, "a", encoding="utf-8", buffering=1)  # line-buffered: each line reaches the file
        self.file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.created))} {header}\n")
        for line in self.pending:
            self.file.write(line + "\n")
        self.file.flush()
        self.pending = []

    def failed(self, err: BaseException) -> None:
        """The error that ended the run, in train.log: the lines the user sees, or the traceback of a bug."""
        from ftkit.errors import FtkitError, Interrupted

        if isinstance(err, (FtkitError, Interrupted)):
            for line in getattr(err, "lines", [str(err)]):
                self.record(f"ftkit: {getattr(err, 'label', 'error')}: {line}")
        elif isinstance(err, KeyboardInterrupt):
            self.record("ftkit: interrupted")
        else:
            self.record("".join(traceback.format_exception(err)).rstrip())

    def close(self) -> None:
        self.stop_live()
        if self.file is not None:
            self.file.close()
            self.file = None

    # ---------------------------------------------------------------- the live display
    @property
    def console(self):
        if self._console is None and self.live_mode:
            from rich.console import Console

            self._console = Console(file=self.stream)
        return self._console

    def start_live(self) -> None:
        if self._live is not None or self.summarising:
            return
        from rich.live import Live

        self._live = Live(console=self.console, get_renderable=self.render, refresh_per_second=8,
                          redirect_stdout=True, redirect_stderr=True)
        self._live.start()

    def stop_live(self) -> None:
        if self._live is not None:
            self._live.transient = not self.training  # a phase spinner goes; the training picture stays as it ended
            self._live.stop()
            self._live = None

    def render(self):
        from ftkit.train.live_view import render

        return render(self)


def is_terminal(stream: TextIO) -> bool:
    """A terminal rich can draw on (not `| tee`, not a file, not TERM=dumb)."""
    from rich.console import Console

    console = Console(file=stream)
    return console.is_terminal and not console.is_dumb_terminal
