"""`ftkit preview`: statistics and rendered masks without weights; bad data is one line and exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import ROOT, write_jsonl
from tests.helpers import cli as run

QA = [{"role": "user", "content": "Question?"}, {"role": "assistant", "content": "Answer."}]


def recipe(tmp_path: Path, tiny_model: Path, source: Path, extra: str = "") -> Path:
    path = tmp_path / "r.yml"
    path.write_text(f"model_name_or_path: {tiny_model}\ndataset_mixer:\n  {source}: 1.0\n{extra}", encoding="utf-8")
    return path


def test_preview_json_statistics(tmp_path, tiny_model, capsys):
    rows = [{"messages": QA}] * 3 + [{"messages": [QA[0], {"role": "assistant", "content": "word " * 300}]}]
    source = write_jsonl(tmp_path / "d.jsonl", rows)
    code, out, err = run(["preview", str(recipe(tmp_path, tiny_model, source, "max_length: 64\n")), "--json"], capsys)
    assert code == 0, err
    stats = json.loads(out)
    assert stats["rows_per_source_before_mixing"] == {f"{source}[train]": 4}
    assert stats["train_samples"] == 4 and stats["truncated"] == 1 and stats["token_length"]["max"] == 64
    assert 0 < stats["trained_fraction"] < 1 and stats["trained_tokens"] < stats["tokens"]


def test_overlong_drop_is_counted(tmp_path, tiny_model, capsys):
    rows = [{"messages": QA}, {"messages": [QA[0], {"role": "assistant", "content": "word " * 300}]}]
    source = write_jsonl(tmp_path / "d.jsonl", rows)
    code, out, _ = run(["preview", str(recipe(tmp_path, tiny_model, source, "max_length: 64\noverlong: drop\n")),
                        "--json"], capsys)
    stats = json.loads(out)
    assert (code, stats["train_samples"], stats["dropped_overlong"], stats["truncated"]) == (0, 1, 1, 0)


def test_preview_renders_masks_with_end_of_turn_trained(tmp_path, tiny_model, capsys):
    from ftkit.commands.preview import token_pieces

    source = write_jsonl(tmp_path / "d.jsonl", [{"messages": QA}])
    code, out, err = run(["preview", str(recipe(tmp_path, tiny_model, source, "chat_template: chatml\n")), "-n", "1"],
                         capsys)
    assert code == 0, err
    assert "end-of-turn token: '<|im_end|>'" in out and "Answer.<|im_end|>" in out
    from ftkit.config.arguments import ModelArguments
    from ftkit.train.model import load_tokenizer

    tokenizer, chat_format, _ = load_tokenizer(ModelArguments(model_name_or_path=str(tiny_model)), "chatml",
                                               log=lambda *_: None)
    [encoded] = chat_format.encode(QA)
    trained = "".join(text for text, is_trained in token_pieces(tokenizer, encoded.input_ids, encoded.labels)
                      if is_trained)
    assert trained == "Answer.<|im_end|>"


@pytest.mark.parametrize("content, message", [
    ('{"question": "q", "answer": "a"}\n',
     "source '{src}': cannot tell the format from columns ['answer', 'question']; tried messages, conversations "
     "(ShareGPT), instruction/output (Alpaca), prompt/completion, text. Map your columns with dataset_mixture "
     "`columns: {{your_question: prompt, your_answer: completion}}`"),
    ('{"messages": [{"role": "user", "content": "q"}]}\n',
     "source '{src}', row 1: no assistant turn: nothing to learn from (set on_bad_rows: skip to skip such rows)"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}\n',
     "source '{src}', row 1: turn 2: empty assistant turn (set on_bad_rows: skip to skip such rows)"),
    ('{"conversations": [{"from": "alien", "value": "q"}]}\n',
     "source '{src}', row 1: unknown ShareGPT speaker 'alien'; expected one of ['assistant', 'bot', "
     "'function_call', 'gpt', 'human', 'model', 'observation', 'system', 'tool', 'user'] (set on_bad_rows: skip to skip such rows)"),
    ('{"messages": []}\n{"messages": [}\n', "{src}:2: not valid JSON: Expecting value (column 15)"),
])
def test_bad_data_is_one_line_with_exit_2(tmp_path, tiny_model, capsys, content, message):
    source = tmp_path / "bad.jsonl"
    source.write_text(content, encoding="utf-8")
    code, _, err = run(["preview", str(recipe(tmp_path, tiny_model, source)), "--json"], capsys)
    assert code == 2
    assert err.strip().splitlines()[-1] == "ftkit: error: " + message.format(src=source)


def test_malformed_json_array_names_the_line(tmp_path, tiny_model, capsys):
    source = tmp_path / "bad.json"
    source.write_text('[\n  {"instruction": "q", "output": "a"},\n  {"instruction": "q" "output": "a"}\n]\n')
    code, _, err = run(["preview", str(recipe(tmp_path, tiny_model, source)), "--json"], capsys)
    assert code == 2 and err.strip().splitlines()[-1] == f"ftkit: error: {source}:3: not valid JSON: Expecting ',' delimiter"


def test_skipped_rows_are_counted(tmp_path, tiny_model, capsys):
    source = write_jsonl(tmp_path / "d.jsonl", [{"messages": QA}, {"messages": [QA[0]]}])
    code, out, _ = run(["preview", str(recipe(tmp_path, tiny_model, source, "on_bad_rows: skip\n")), "--json"], capsys)
    assert code == 0 and json.loads(out)["skipped_bad_rows"] == 1 and json.loads(out)["train_samples"] == 1


def test_preview_of_the_demo_recipe(tiny_model, capsys, monkeypatch):
    code, out, err = run(["preview", str(ROOT / "recipes" / "tiny-demo.yml"), "--set", f"model_name_or_path={tiny_model}",
                          "--set", f"dataset_mixer={{{ROOT / 'recipes/data/tiny_demo.jsonl'}: 1.0}}", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["train_samples"] == 24


def test_unreachable_hub_dataset_fails_at_once_with_the_offline_hint(tmp_path, tiny_model):
    """The hub probe runs before datasets is imported (datasets reads HF_HUB_OFFLINE once, at import): with the
    hub unreachable, a hub dataset that is not cached is one line with the offline hint, not a connection retry."""
    import socket

    from ftkit.hub import OFFLINE_HINT
    from tests.helpers import ftkit

    with socket.socket() as s:  # a local port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "r.yml"
    path.write_text(f"model_name_or_path: {tiny_model}\ndataset_name: someorg/somedata\n", encoding="utf-8")
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HOME": str(tmp_path / "hf")}
    result = ftkit("preview", str(path), "--json", env=env, unset=("HF_HUB_OFFLINE",))
    assert result.returncode == 2
    assert [line for line in result.stderr.splitlines() if line.startswith(("note:", "ftkit:"))] == [
        "note: the Hugging Face Hub is not reachable; using only locally cached files for someorg/somedata",
        f"ftkit: error: dataset 'someorg/somedata' could not be loaded: {OFFLINE_HINT}"]
    assert "Traceback" not in result.stderr and result.stdout == ""
