"""The loss curve ftkit draws itself (train/chart.py): a valid SVG whose lines are where the numbers say."""

from __future__ import annotations

import math

from ftkit.train.artifacts import plot_loss
from ftkit.train.chart import HEIGHT, LEFT, RIGHT, TOP, WIDTH, nice_ticks
from tests.helpers import chart_lines


def test_ticks_are_round_and_cover_the_range():
    assert nice_ticks(0.013, 5.2) == [0, 2, 4, 6]
    flat = nice_ticks(3.0, 3.0)  # a flat line still gets an axis
    assert flat[0] < 3.0 < flat[-1] and 3.0 in flat
    ticks = nice_ticks(-0.37, 0.81)
    assert ticks[0] <= -0.37 and ticks[-1] >= 0.81 and len(ticks) <= 8


def test_train_and_eval_lines_are_drawn_to_scale(tmp_path):
    history = [{"step": 10, "loss": 4.0}, {"step": 20, "loss": 2.0}, {"step": 20, "eval_loss": 3.0},
               {"step": 30, "loss": float("nan")}, {"step": 40, "loss": 0.0}, {"step": 40, "eval_loss": 1.0}]
    plot_loss(history, tmp_path / "loss_curve.svg")
    lines = chart_lines(tmp_path / "loss_curve.svg")
    assert list(lines) == ["train loss", "eval loss"]
    train = lines["train loss"]
    assert len(train) == 3  # the NaN step is left out, not drawn at the edge
    # ticks 0..4 in y and 10..40 in x fill the plot area exactly: corners are the data's extremes
    assert train[0] == (LEFT, TOP) and train[-1] == (WIDTH - RIGHT, HEIGHT - 44)
    assert math.isclose(train[1][1], TOP + (HEIGHT - TOP - 44) / 2)


def test_a_preference_run_gets_a_second_panel(tmp_path):
    history = [{"step": s, "loss": 1.0 / s, "rewards/chosen": 0.1 * s, "rewards/rejected": -0.1 * s,
                "rewards/margins": 0.2 * s, "rewards/accuracies": 1.0} for s in (1, 2, 3)]
    plot_loss(history, tmp_path / "curve.svg")
    lines = chart_lines(tmp_path / "curve.svg")
    assert "train loss" in lines and "rewards chosen" in lines and "reward margin" in lines
    assert min(x for x, _ in lines["rewards chosen"]) >= WIDTH  # drawn in the second panel, right of the first


def test_labels_are_escaped(tmp_path):
    from ftkit.train.chart import Panel, Series, chart_svg

    svg = chart_svg([Panel("a <b> & c", "y", [Series("x < y", [(0, 1), (1, 2)])])])
    (tmp_path / "c.svg").write_text(svg)
    assert list(chart_lines(tmp_path / "c.svg")) == ["x < y"]
