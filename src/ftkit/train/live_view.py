"""The live display's picture (rich renderables), redrawn a few times a second from RunDisplay's state:

    ⠹ training ━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━ 120/400 · epoch 1.50 · 31s elapsed · eta 1m02s
      loss 0.532 (last 0.518) · lr 2.0e-4 · grad norm 0.81 · 4,410 tok/s · mem 5.1 GB
"""

from __future__ import annotations

from rich.console import Group
from rich.progress_bar import ProgressBar
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from ftkit.train.step_lines import duration, number, scientific


def spinner(display, text: Text) -> Spinner:
    """One Spinner for the whole run: a new one each frame would always show its first frame."""
    if getattr(display, "spinner", None) is None:
        display.spinner = Spinner("dots", style="cyan")
    display.spinner.update(text=text)
    return display.spinner


def render(display):
    report = display.report
    if not display.training or report is None:
        label = Text(display.phase_text, style="bold", no_wrap=True, overflow="ellipsis")
        if display.detail:
            label.append(f"  {display.detail}", style="dim")
        return spinner(display, label)
    where = [f"{report.step}/{report.total}"]
    if report.epoch is not None:
        where.append(f"epoch {report.epoch:.2f}")
    where.append(f"{duration(report.elapsed)} elapsed")
    if report.eta is not None and not display.finished:
        where.append(f"eta {duration(report.eta)}")
    if display.detail:
        where.append(display.detail)
    if not display.finished:
        status = spinner(display, Text("training", style="bold"))
    else:  # early stopping, Ctrl-C or a NaN guard end a run before its last step
        complete = report.step >= report.total
        status = Text("✓ trained" if complete else "■ stopped", style="bold green" if complete else "bold yellow")
    head = Table.grid(padding=(0, 1))
    head.add_column(no_wrap=True, width=11)
    head.add_column(ratio=1)
    head.add_column(no_wrap=True)
    head.add_row(status, ProgressBar(total=max(report.total, 1), completed=report.step), Text(" · ".join(where)))
    return Group(head, metrics_text(report))  # always two lines: a live area that changes height can leave a stray frame


def metrics_text(report) -> Text:
    parts = []
    if report.smoothed_loss is not None:
        parts.append(f"loss {number(report.smoothed_loss)}"
                     + (f" (last {number(report.loss)})" if report.loss is not None else ""))
    if report.learning_rate is not None:
        parts.append(f"lr {scientific(report.learning_rate)}")
    if report.grad_norm is not None:
        parts.append(f"grad norm {number(report.grad_norm)}")
    if report.tokens_per_second is not None:
        parts.append(f"{report.tokens_per_second:,.0f} tok/s")
    if report.memory_gb is not None:
        parts.append(f"mem {report.memory_gb:.1f} GB")
    return Text("  " + " · ".join(parts) if parts else "  waiting for the first logging step", no_wrap=True,
                overflow="ellipsis")
