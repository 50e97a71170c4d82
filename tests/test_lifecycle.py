"""A run's life: what ftkit refuses to train over, overwrite and resume, Ctrl-C and a kill while saving,
secrets kept out of every file, and a run that did not learn said so."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT, ftkit, make_recipe, snapshot

SECRET = "hf_do_not_save_me"  # make_recipe's hub_token


def test_foreign_output_dir_is_refused_and_left_alone(tiny_model, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "README.md").write_text("my notes\n", encoding="utf-8")
    before = snapshot(out)
    recipe = make_recipe(tmp_path, tiny_model, "mine", max_steps=2)
    result = ftkit("train", str(recipe))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"ftkit: error: output_dir '{out}' holds files ftkit did not write (README.md); choose another output_dir, "
        "or set overwrite_output_dir: true to train into it (only ftkit's own files there are replaced)"]
    assert snapshot(out) == before


@pytest.mark.parametrize("kind", ["file", "unwritable"])
def test_output_dir_that_cannot_be_written_is_refused_before_loading(tiny_model, tmp_path, kind):
    target = tmp_path / "out"
    if kind == "file":
        target.write_text("not a folder\n", encoding="utf-8")
        expected = f"ftkit: error: output_dir '{target}' is a file, not a directory; choose another output_dir"
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        target = locked / "out"
        expected = (f"ftkit: error: output_dir '{target}' cannot be written ({locked} is not writable); "
                    "choose another output_dir")
    recipe = make_recipe(tmp_path, tiny_model, "x", output_dir=str(target), max_steps=2)
    try:
        if kind == "unwritable" and os.access(target.parent, os.W_OK):
            pytest.skip("running as a user that can write anywhere")  # root ignores directory permissions
        result = ftkit("train", str(recipe))
    finally:
        (tmp_path / "locked").chmod(0o700) if (tmp_path / "locked").exists() else None
    assert (result.returncode, result.stderr.splitlines()) == (2, [expected])


def test_resume_needs_an_unfinished_run_with_a_checkpoint(tiny_model, tmp_path):
    recipe = make_recipe(tmp_path, tiny_model, "fresh", max_steps=2)
    result = ftkit("train", str(recipe), "--resume")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"ftkit: error: output_dir '{tmp_path / 'fresh'}' has no complete checkpoint to resume from; train without "
        "--resume (or resume_from_checkpoint) to start"]
    assert not (tmp_path / "fresh").exists()


@pytest.fixture(scope="module")
def finished_with_checkpoints(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finished")
    recipe = make_recipe(tmp, tiny_model, "run", max_steps=4, save_strategy="steps", save_steps=2, logging_steps=1)
    result = ftkit("train", str(recipe), env={"MY_SERVICE_TOKEN": "sk-env-secret-123"})
    assert result.returncode == 0, result.stderr[-2000:]
    return tmp, recipe


@pytest.mark.slow
def test_no_secret_reaches_any_file_of_the_run(finished_with_checkpoints):
    tmp, _ = finished_with_checkpoints
    out = tmp / "run"
    assert (out / "checkpoint-2" / "training_args.bin").is_file()  # the pickled arguments are scanned too
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert SECRET.encode() not in data and b"sk-env-secret-123" not in data, path


@pytest.mark.slow
def test_finished_run_is_neither_resumed_nor_overwritten_unasked(finished_with_checkpoints):
    tmp, recipe = finished_with_checkpoints
    out = tmp / "run"
    before = snapshot(out)
    again = ftkit("train", str(recipe))
    assert again.returncode == 2
    assert again.stderr.splitlines() == [f"ftkit: error: output_dir '{out}' already holds a finished run; choose "
                                         "another output_dir, or set overwrite_output_dir: true to replace it"]
    resumed = ftkit("train", str(recipe), "--resume")
    assert resumed.returncode == 2
    assert resumed.stderr.splitlines() == [
        f"ftkit: error: output_dir '{out}' holds a finished run; there is nothing to resume (choose another "
        "output_dir, or set overwrite_output_dir: true to train it again)"]
    assert snapshot(out) == before


@pytest.mark.slow
def test_overwrite_removes_the_old_runs_checkpoints_and_keeps_other_files(tiny_model, tmp_path):
    recipe = make_recipe(tmp_path, tiny_model, "run", max_steps=4, save_strategy="steps", save_steps=2)
    assert ftkit("train", str(recipe)).returncode == 0
    out = tmp_path / "run"
    (out / "my_notes.txt").write_text("keep me\n", encoding="utf-8")
    assert (out / "checkpoint-4").is_dir()
    redo = ftkit("train", str(recipe), "--set", "overwrite_output_dir=true", "--set", "save_strategy=no",
                 "--set", "max_steps=3")
    assert redo.returncode == 0, redo.stderr[-2000:]
    assert not list(out.glob("checkpoint-*"))  # a later --resume cannot pick up the old run's weights
    assert (out / "my_notes.txt").read_text(encoding="utf-8") == "keep me\n"
    assert json.loads((out / "train_summary.json").read_text())["global_step"] == 3


def test_a_run_killed_while_saving_is_unfinished_everywhere(tiny_model, tmp_path, trained_run):
    """What a kill between the adapter and the completion marker leaves: every verb says so in one line."""
    import shutil

    out = tmp_path / "killed"
    shutil.copytree(trained_run, out)
    (out / "ftkit_run.json").unlink()
    chat = ftkit("chat", "--adapter", str(out), "--prompt", "hi")
    assert chat.returncode == 2
    assert chat.stderr.splitlines() == [f"ftkit: error: {out}: this run did not finish (no ftkit_run.json); "
                                        "resume it with `ftkit train RECIPE --resume`"]
    (out / "ftkit_run.json").write_bytes(b"")  # torn by the kill: an empty file, the marker's old failure
    merge = ftkit("merge", "--adapter", str(out), "--output", str(tmp_path / "merged"))
    assert merge.returncode == 2 and merge.stderr.splitlines() == chat.stderr.splitlines()
    recipe = make_recipe(tmp_path, tiny_model, "killed", max_steps=2)
    train = ftkit("train", str(recipe))
    assert train.returncode == 2
    assert train.stderr.splitlines() == [f"ftkit: error: output_dir '{out}' holds an unfinished run with no "
                                         "checkpoint; set overwrite_output_dir: true to start over, or choose "
                                         "another output_dir"]


def _wait_for(path, proc, timeout=240):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "training never reached its first checkpoint"
        time.sleep(0.2)


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_the_whole_run(tiny_model, tmp_path):
    recipe = make_recipe(tmp_path, tiny_model, "run", max_steps=400, save_strategy="steps", save_steps=20,
                         logging_steps=5, eval_samples=0)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ftkit", "train", str(recipe)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(out / "checkpoint-20" / "trainer_state.json", proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 130, stderr[-3000:]
    newest = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    lines = stderr.splitlines()
    assert lines[-2:] == [f"ftkit: interrupted: stopped; saved {newest}", f"ftkit: interrupted: continue with: "
                                                                          f"ftkit train {recipe} --resume"]
    assert int(newest.name.split("-")[1]) < 400 and not (out / "ftkit_run.json").exists()
    resumed = ftkit("train", str(recipe), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {newest}" in resumed.stdout
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == 400
    assert summary["train_losses"][0][0] == 5  # the whole run's losses, not only the resumed part
    assert (out / "ftkit_run.json").is_file()


@pytest.mark.slow
def test_a_diverged_run_ends_with_a_warning(tiny_model, tmp_path):
    recipe = make_recipe(tmp_path, tiny_model, "hot", max_steps=30, learning_rate=1e6, logging_steps=5,
                         eval_samples=0)
    result = ftkit("train", str(recipe))
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "hot" / "train_summary.json").read_text())
    assert summary["warnings"], summary["train_losses"]
    assert f"warning: {summary['warnings'][0]}" in result.stdout
    assert "done, with warnings:" in result.stdout


def test_a_copied_run_cannot_turn_on_remote_code_by_itself(tmp_path, trained_run):
    """ftkit_run.json records trust_remote_code: true from the recipe; chat & co. still need the user's flag."""
    import shutil

    run = tmp_path / "copied"
    shutil.copytree(trained_run, run)
    meta = json.loads((run / "ftkit_run.json").read_text())
    (run / "ftkit_run.json").write_text(json.dumps({**meta, "trust_remote_code": True}))
    expected = ["ftkit: error: this run's model needs its own Python code from the hub (the recipe had "
                "trust_remote_code: true); pass --trust-remote-code to run that code now"]
    for verb in (["chat", "--adapter", str(run), "--prompt", "hi"],
                 ["merge", "--adapter", str(run), "--output", str(tmp_path / "m")],
                 ["predict", "--adapter", str(run), "--input", str(ROOT / "recipes/data/tiny_demo.jsonl"),
                  "--output", str(tmp_path / "p.jsonl")]):
        result = ftkit(*verb)
        assert (result.returncode, result.stderr.splitlines()) == (2, expected), verb
    allowed = ftkit("chat", "--adapter", str(run), "--prompt", "hi", "--trust-remote-code", "--max-new-tokens", "2")
    assert allowed.returncode == 0, allowed.stderr[-2000:]  # a local Llama has no remote code: it loads as usual
    assert not (tmp_path / "m").exists() and not (tmp_path / "p.jsonl").exists()


@pytest.mark.slow
def test_overwrite_into_a_foreign_folder_removes_none_of_its_files(tiny_model, tmp_path):
    """overwrite_output_dir on a folder ftkit never wrote: train into it, delete nothing that was there."""
    out = tmp_path / "shared"
    (out / "runs").mkdir(parents=True)
    (out / "runs" / "mine.txt").write_text("my tensorboard notes\n", encoding="utf-8")
    (out / "samples.md").write_text("my samples\n", encoding="utf-8")
    (out / "README.md").write_text("# my project\n", encoding="utf-8")
    recipe = make_recipe(tmp_path, tiny_model, "shared", max_steps=2, overwrite_output_dir=True, eval_samples=0)
    result = ftkit("train", str(recipe))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "runs" / "mine.txt").read_text(encoding="utf-8") == "my tensorboard notes\n"
    assert (out / "samples.md").read_text(encoding="utf-8") == "my samples\n"
    assert (out / "README.md").read_text(encoding="utf-8") == "# my project\n"
    assert (out / "ftkit_run.json").is_file()
