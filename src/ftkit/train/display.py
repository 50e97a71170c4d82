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

import sys
import time
import traceback
from pathlib import Path
from typing import Callable, TextIO

from ftkit.train.step_lines import StepReport, step_line

LEVELS = ("quiet", "normal", "verbose")


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
