"""The plain lines of a run: one per logging step, made to be parsed (`step_line`), one per evaluation, and the
number formats the live view shares with them."""

from __future__ import annotations

import re
from dataclasses import dataclass, field


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
