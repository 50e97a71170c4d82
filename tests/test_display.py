"""The training display: the plain line per logging step, what each level shows, train.log, and library output
kept off the screen (transformers' raw dicts and bars, datasets' bars, warnings shown once)."""

from __future__ import annotations

import logging
import warnings

import pytest

from ftkit.train.display import RunDisplay
from ftkit.train.step_lines import StepReport, duration, eval_line, step_line
from tests.helpers import ftkit, make_recipe, parse_step_line

BAR_TEXT = ("it/s]", "%|", "Loading weights", "Tokenising", "Generating train split", "Filter", "Map",
            "Writing model shards", "{'loss'", "'grad_norm'", "'train_runtime'")


def report(**overrides) -> StepReport:
    values = dict(step=120, total=400, epoch=1.5, loss=0.532, smoothed_loss=0.55, learning_rate=2e-4, grad_norm=0.81,
                  tokens_per_second=4410.4, memory_gb=5.12, elapsed=31, eta=62)
    return StepReport(**{**values, **overrides})


def test_step_line_is_the_documented_format_and_parses_back():
    line = step_line(report())
    assert line == "step 120/400 epoch 1.5 loss 0.532 lr 2.0e-4 grad_norm 0.81 tok/s 4410 mem_gb 5.1 elapsed 31s eta 1m02s"
    assert parse_step_line(line) == {"step": 120, "total": 400, "epoch": 1.5, "loss": 0.532, "lr": 2e-4,
                                     "grad_norm": 0.81, "tok/s": 4410, "mem_gb": 5.1, "elapsed": 31, "eta": 62}
    bare = step_line(report(epoch=None, grad_norm=None, tokens_per_second=None, memory_gb=None, eta=None,
                            loss=1.23e-5, learning_rate=0.0, elapsed=3725))
    assert bare == "step 120/400 loss 1.23e-05 lr 0.0e0 elapsed 1h02m05s"
    assert parse_step_line(bare)["loss"] == pytest.approx(1.23e-5)
    assert duration(59.6) == "1m00s" and duration(0) == "0s"
    assert eval_line(10, 20, {"eval_loss": 0.61234, "perplexity": 1.8446}) == "eval step 10/20 loss 0.6123 perplexity 1.845"


@pytest.mark.parametrize("level, shown", [
    ("quiet", ["done: 1 step"]),
    ("normal", ["note: a note", "[loading model]", step_line(report()), "warning: transformers: careful",
                "done: 1 step"]),
    ("verbose", ["note: a note", "[loading model]", step_line(report()), "transformers info: loading",
                 "warning: transformers: careful", "done: 1 step"]),
])
def test_each_level_shows_its_lines_and_train_log_records_them_all(level, shown, tmp_path):
    screen: list[str] = []
    display = RunDisplay(level, live=False, echo=screen.append)
    display("note: a note")
    display.phase("loading model")
    display.step(report())
    display.library("transformers info: loading")
    display.warn_once("transformers: careful")
    display.attach_log(tmp_path / "train.log", "ftkit train test")
    display.warn_once("transformers: careful")  # shown once, recorded twice
    display.summary("done: 1 step")
    display.close()
    assert screen == shown
    recorded = [line.split(" ", 1)[1] for line in (tmp_path / "train.log").read_text().splitlines()[1:]]
    assert recorded == ["note: a note", "[loading model]", step_line(report()), "transformers info: loading",
                        "warning: transformers: careful", "warning: transformers: careful", "done: 1 step"]


def test_a_crash_leaves_its_traceback_in_train_log(tmp_path):
    display = RunDisplay("normal", live=False, echo=lambda _line: None)
    display.attach_log(tmp_path / "train.log", "ftkit train test")
    display("step one")
    try:
        raise RuntimeError("CUDA out of memory")
    except RuntimeError as err:
        display.failed(err)
    text = (tmp_path / "train.log").read_text()  # written through before close
    assert "step one" in text and "Traceback" in text and "RuntimeError: CUDA out of memory" in text


def test_library_warnings_are_shown_once_and_put_back_after_the_run(tmp_path):
    import transformers  # noqa: F401 - its own handler is installed on import: the state to put back

    from ftkit.train.library_output import library_output

    screen: list[str] = []
    display = RunDisplay("normal", live=False, echo=screen.append)
    logger = logging.getLogger("transformers.trainer")
    before = logging.getLogger("transformers").handlers[:]
    with library_output(display):
        logger.warning("eval_strategy is set but nothing to evaluate")
        logger.warning("eval_strategy is set but nothing to evaluate")
        logger.info("***** Running training *****")
        logger.warning("`use_cache=True` is incompatible with gradient checkpointing. Setting `use_cache=False`.")
        logging.getLogger("bitsandbytes.cextension").warning("no GPU kernels")
        warnings.warn("a Python warning from a library", UserWarning, stacklevel=1)
    assert screen == ["warning: transformers: eval_strategy is set but nothing to evaluate",
                      "warning: python: UserWarning: a Python warning from a library"]
    assert logging.getLogger("transformers").handlers == before
    display.attach_log(tmp_path / "train.log", "test")
    text = (tmp_path / "train.log").read_text()
    assert text.count("nothing to evaluate") == 2 and "Running training" in text and "no GPU kernels" in text


@pytest.mark.slow
def test_train_without_a_terminal_prints_one_parseable_line_per_logging_step(tiny_model, tmp_path):
    recipe = make_recipe(tmp_path, tiny_model, "run", max_steps=20, logging_steps=5, test_split_size=2,
                         eval_strategy="steps", eval_steps=10, eval_samples=0)
    result = ftkit("train", str(recipe), "--no-cache", env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    steps = [parse_step_line(line) for line in lines if line.startswith("step ")]
    assert [s["step"] for s in steps] == [5, 10, 15, 20] and {s["total"] for s in steps} == {20}
    for s in steps:
        assert s["loss"] > 0 and s["lr"] == 1e-2 and s["grad_norm"] >= 0 and s["tok/s"] > 0 and s["eta"] >= 0
    evals = [line for line in lines if line.startswith("eval step ")]
    assert [line.split()[2] for line in evals] == ["10/20", "20/20"]
    assert all(float(line.split()[4]) > 0 and line.split()[3] == "loss" for line in evals)
    for text in (result.stdout, result.stderr):
        assert not [bar for bar in BAR_TEXT if bar in text], text[-2000:]
    log = (tmp_path / "run" / "train.log").read_text(encoding="utf-8")
    for line in lines:
        if line.strip():
            assert f" {line}\n" in log, line


def test_before_after_table_aligns_chinese_text_by_terminal_cells():
    from rich.cells import cell_len

    from ftkit.commands.predict import clip
    from ftkit.train.samples import Sample, table

    rows = table([Sample([], "疑是地上霜。舉頭望明月，低頭思故鄉。" * 3, before="abc", after="疑是地上霜。"),
                  Sample([], "The capital of Ftkitland is Tinyville.", before="佐布星有三個月亮。", after="食咗喇，唔該晒！")],
                 width=20).splitlines()
    separators = [[cell_len(line[:i]) for i in range(len(line)) if line.startswith(" | ", i)] for line in rows]
    assert separators == [[20, 43]] * 3, rows
    assert rows[1].startswith("疑是地上霜。舉頭望…  |") and rows[1].endswith("| 疑是地上霜。")
    assert cell_len(clip("佐布星有三個月亮。" * 20, 30)) <= 30 and clip("短い", 30) == "短い"


def test_the_live_view_renders_phases_progress_and_the_final_frame():
    import io

    from rich.console import Console

    from ftkit.train.live_view import render

    stream = io.StringIO()
    display = RunDisplay("normal", live=True, stream=stream)
    display.phase("loading model models/tiny", "Loading weights 3/21")
    console = Console(file=io.StringIO(), width=100)
    console.print(render(display))
    assert "loading model models/tiny  Loading weights 3/21" in console.file.getvalue()
    display.start_training(400)
    display.step(report())
    display.set_detail("evaluating 2/5")
    console = Console(file=io.StringIO(), width=120)
    console.print(render(display))
    frame = console.file.getvalue().splitlines()
    assert len(frame) == 2 and "120/400 · epoch 1.50 · 31s elapsed · eta 1m02s · evaluating 2/5" in frame[0]
    assert frame[1] == "  loss 0.55 (last 0.532) · lr 2.0e-4 · grad norm 0.81 · 4,410 tok/s · mem 5.1 GB"
    display.end_training()
    console = Console(file=io.StringIO(), width=120)
    console.print(render(display))
    assert console.file.getvalue().startswith("■ stopped")  # ended before its last step (Ctrl-C, early stopping)
    display.advance(400, 4.0, 90, 0)
    display.summary("done: 400 steps")
    display.close()
    shown = stream.getvalue()
    assert "✓ trained" in shown and shown.rstrip().endswith("done: 400 steps")
