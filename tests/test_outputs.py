"""Outputs people share: the run's model card (README.md) and predict's metrics file."""

from __future__ import annotations

import json
import re

import pytest

from ftkit import __version__, rundir
from tests.helpers import CHATS, SYSTEM, ftkit, make_recipe, rows, write_jsonl

SECTIONS = ["## Method", "## Data", "## Training settings", "## Results", "## Use it", "## Serve it",
            "## Framework versions"]


@pytest.mark.slow
def test_the_run_directory_has_a_real_model_card(trained_run):
    from huggingface_hub import ModelCard

    path = trained_run / "README.md"
    card = ModelCard.load(path)
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "text-generation"
    assert {"ftkit", "trl", "sft", "lora"} <= set(card.data.tags)
    text = path.read_text(encoding="utf-8")
    assert rundir.is_ftkit_card(path) and "[More Information Needed]" not in text  # not PEFT's empty template
    assert [line for line in text.splitlines() if line.startswith("## ")] == SECTIONS
    summary = json.loads((trained_run / "train_summary.json").read_text())
    base = json.loads((trained_run / "ftkit_run.json").read_text())["base_model"]
    assert f"`{base}` fine-tuned with ftkit {__version__}: LoRA." in text
    assert "| rank r | 8 |" in text and "| trained in full | embed_tokens, lm_head |" in text
    assert "| `chats.jsonl[train]` | 7 available, 7 used |" in text.replace(str(trained_run.parent) + "/", "")
    assert (f"| train loss (first → final) | {summary['first_train_loss']:.4f} → "
            f"{summary['final_train_loss']:.4f} |") in text
    assert "| `learning_rate` | 0.01 |" in text and "| `max_steps` | 150 |" in text
    assert f"ftkit serve --adapter {trained_run.resolve()}" in text and "vllm serve " in text
    assert f"- ftkit {__version__}" in text and re.search(r"^- peft \d", text, re.M)


@pytest.mark.slow
def test_the_cards_transformers_snippet_answers_like_ftkit(trained_run):
    """The card's plain transformers + PEFT code, run as written (one prompt swapped in), gives the trained answer."""
    text = (trained_run / "README.md").read_text(encoding="utf-8")
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    question, answer = CHATS[1]
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    code = re.sub(r"^messages = .*$", f"messages = {messages!r}", code, flags=re.M)
    printed: list[str] = []
    exec(compile(code, "README.md", "exec"), {"print": printed.append})  # noqa: S102 - the card ftkit wrote
    assert printed == [answer]


def test_a_users_readme_is_kept_and_the_card_goes_beside_it(tmp_path):
    from ftkit.train.model_card import write_card

    (tmp_path / "README.md").write_text("# my project\n", encoding="utf-8")
    notes: list[str] = []
    assert write_card(tmp_path, f"---\n---\n{rundir.CARD_MARK}\n# card\n", notes.append) == tmp_path / rundir.CARD_ASIDE
    assert (tmp_path / "README.md").read_text(encoding="utf-8") == "# my project\n" and len(notes) == 1
    ours = tmp_path / "ours"
    ours.mkdir()
    write_card(ours, f"---\n---\n{rundir.CARD_MARK}\n# old card\n")
    assert write_card(ours, f"---\n---\n{rundir.CARD_MARK}\n# new card\n") == ours / "README.md"
    assert "new card" in (ours / "README.md").read_text(encoding="utf-8")
    assert rundir.clear_run(ours) == ["README.md"]  # an earlier run's card goes with the run


def test_another_trainers_output_with_checkpoints_is_not_an_unfinished_ftkit_run(tmp_path):
    """transformers' Trainer leaves the final model beside checkpoint-N: chat --model must load it, and training must
    not take it for a killed ftkit run (whose files overwrite_output_dir removes)."""
    (tmp_path / "checkpoint-500").mkdir()
    (tmp_path / "checkpoint-500" / "trainer_state.json").write_text("{}")
    (tmp_path / "config.json").write_text("{}")
    assert rundir.state(tmp_path) == "foreign"
    rundir.require_finished(tmp_path)  # no error
    rundir.claim(tmp_path, "run")
    assert rundir.state(tmp_path) == "unfinished"


def test_clear_run_removes_only_what_the_run_wrote(tmp_path):
    """A shared folder trained into with overwrite_output_dir: the user's files named like ftkit's (there before the
    run, or added after it finished) survive clearing the run; what the run wrote goes."""
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "mine.txt").write_text("other runs' logs\n")
    (tmp_path / "config.json").write_text("{}\n")
    rundir.claim(tmp_path, "run")
    for name in ("adapter_model.safetensors", "train.log", "checkpoint-2"):
        (tmp_path / name).mkdir() if name.startswith("checkpoint") else (tmp_path / name).write_text("ftkit\n")
    rundir.finish(tmp_path, {"peft": True})
    (tmp_path / "wandb").mkdir()
    (tmp_path / "vocab.json").write_text("added later\n")
    assert sorted(rundir.clear_run(tmp_path)) == sorted(["adapter_model.safetensors", "train.log", "checkpoint-2",
                                                         rundir.DONE, rundir.OWNER])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "runs", "vocab.json", "wandb"]
    assert (tmp_path / "runs" / "mine.txt").read_text() == "other runs' logs\n"


def test_clear_run_takes_pefts_blank_template_from_an_earlier_ftkit_run_only(tmp_path):
    (tmp_path / "README.md").write_text("---\n---\n# Model Card for Model ID\n\n" + rundir.PEFT_BLANK_CARD + "\n")
    assert rundir.clear_run(tmp_path) == ["README.md"]
    (tmp_path / "README.md").write_text("# my notes\n")
    assert rundir.clear_run(tmp_path) == [] and (tmp_path / "README.md").exists()


@pytest.mark.slow
def test_predict_writes_its_metrics_beside_the_predictions_and_prints_them_as_json(trained_run, tmp_path):
    data = write_jsonl(tmp_path / "chats.jsonl", rows())
    out = tmp_path / "preds.jsonl"
    result = ftkit("predict", "--adapter", str(trained_run), "--input", str(data), "--output", str(out),
                   "--max-new-tokens", "60", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    printed = json.loads(result.stdout)
    saved = json.loads((tmp_path / "preds.metrics.json").read_text(encoding="utf-8"))
    assert printed == saved
    assert saved["ftkit_predict_metrics"] == 1 and saved["rows"] == saved["scored_rows"] == 7
    assert saved["exact_match"] == 1.0 and saved["chrf"] == pytest.approx(100.0) and saved["worst"] == []
    assert saved["predictions"] == str(out) and saved["generation"]["max_new_tokens"] == 60
    assert "exact match 1.000" in result.stderr and f"metrics: {tmp_path / 'preds.metrics.json'}" in result.stderr

    other = tmp_path / "other.jsonl"
    (tmp_path / "other.metrics.json").write_text("my own notes\n", encoding="utf-8")
    refused = ftkit("predict", "--adapter", str(trained_run), "--input", str(data), "--output", str(other))
    assert (refused.returncode, refused.stderr.strip()) == (
        2, f"ftkit: error: {tmp_path / 'other.metrics.json'} exists and was not written by ftkit predict (its metrics "
           "go there); move it, or choose another --output")
    assert (tmp_path / "other.metrics.json").read_text(encoding="utf-8") == "my own notes\n" and not other.exists()


def test_a_save_straight_into_output_dir_keeps_a_users_readme_and_drops_pefts_template(tmp_path):
    """Sharded (FSDP/DeepSpeed) weights are saved by every process straight into output_dir, where PEFT writes or
    updates README.md; what was there comes back, and PEFT's blank template goes (the model card follows)."""
    from ftkit.train.artifacts import readme_kept

    readme = tmp_path / "README.md"
    readme.write_text("# my project\n")
    with readme_kept(tmp_path):
        readme.write_text("---\nlibrary_name: peft\n---\n# my project\n")  # PEFT updating the user's card
    assert readme.read_text() == "# my project\n"
    readme.unlink()
    with readme_kept(tmp_path):
        readme.write_text("# Model Card for Model ID\n\n" + rundir.PEFT_BLANK_CARD + "\n")
    assert not readme.exists()


@pytest.mark.slow
def test_checkpoints_leave_the_users_readme_and_ftkits_card_alone(tiny_model, tmp_path):
    """TRL's trainers write their own model card into output_dir at every checkpoint; ftkit's card is the one."""
    from ftkit.config.recipe import load_recipe
    from ftkit.train.run import run_training

    fresh = run_training(load_recipe(make_recipe(tmp_path, tiny_model, "fresh", max_steps=2, save_strategy="steps",
                                                 save_steps=1)), log=lambda *_: None)
    assert (fresh / "checkpoint-2").is_dir() and rundir.is_ftkit_card(fresh / "README.md")
    assert not (fresh / rundir.CARD_ASIDE).exists()
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "README.md").write_text("# my project\n", encoding="utf-8")
    lines: list[str] = []
    run_training(load_recipe(make_recipe(tmp_path, tiny_model, "theirs", max_steps=2, save_strategy="steps",
                                         save_steps=1, overwrite_output_dir=True)), log=lines.append)
    assert (theirs / "README.md").read_text(encoding="utf-8") == "# my project\n"
    assert rundir.is_ftkit_card(theirs / rundir.CARD_ASIDE)
