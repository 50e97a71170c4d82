"""ftkit predict: every row of a file answered in left-padded batches with the run's template, scored
against its references, resumable; answerless rows (an Alpaca test file) are answered too."""

from __future__ import annotations

import json

import pytest

from ftkit.inference.options import GenerationOptions
from ftkit.errors import FtkitError
from ftkit.commands.predict import run_predict
from ftkit.inference.metrics import rouge_l, score
from tests.helpers import ftkit, write_jsonl
from tests.helpers import CHATS, MULTI_TURN, SYSTEM, rows


@pytest.fixture(scope="module")
def run_dir(trained_run):
    return trained_run


def read_lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
def test_predict_cli_answers_every_trained_row_and_resumes(run_dir, tmp_path):
    data = write_jsonl(tmp_path / "chats.jsonl", rows())
    out = tmp_path / "preds" / "out.jsonl"
    result = ftkit("predict", "--adapter", str(run_dir), "--input", str(data), "--output", str(out),
                   "--batch-size", "3", "--max-new-tokens", "100")  # batches mix prompt lengths: left padding
    assert result.returncode == 0, result.stderr[-3000:]
    assert "7 rows with references: exact match 1.000, chrF 100.0, BLEU 100.0, ROUGE-L F1 1.000" in result.stdout
    records = read_lines(out)
    references = [a for _, a in CHATS] + [MULTI_TURN[-1][1]]
    assert [r["row"] for r in records] == list(range(1, 8))
    assert out.read_text(encoding="utf-8").count('{"ftkit_predict": 1, "row": ') == 7  # its own, resumable output
    assert [r["output"] for r in records] == [r["reference"] for r in records] == references
    assert records[0]["prompt"] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": CHATS[0][0]}]
    assert [m["role"] for m in records[-1]["prompt"]] == ["system", "user", "assistant", "user"]

    # Resume: two rows lost (one torn mid-write), one kept row altered to show it is not regenerated.
    records[1]["output"] = "kept from the first run"
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records[:5])
                   + '{"ftkit_predict": 1, "row": 6, "pro', encoding="utf-8")
    lines = []
    metrics = run_predict(run_dir, None, None, data, out, GenerationOptions(max_new_tokens=100, greedy=True),
                          batch_size=4, log=lines.append)
    assert f"{out}: 5 of 7 rows already done; answering the other 2" in lines
    again = read_lines(out)
    assert sorted(r["row"] for r in again) == list(range(1, 8))
    assert {r["row"]: r["output"] for r in again} == {i + 1: ("kept from the first run" if i == 1 else ref)
                                                       for i, ref in enumerate(references)}
    assert metrics["exact_match"] == pytest.approx(6 / 7) and [w["row"] for w in metrics["worst"]] == [2]
    assert "worst: row 2" in lines[-1]

    # Everything done: nothing is loaded or generated.
    lines = []
    run_predict(run_dir, None, None, data, out, GenerationOptions(greedy=True), log=lines.append)
    assert lines[0] == f"{out}: 7 of 7 rows already done; answering the other 0"


@pytest.mark.slow
def test_predict_answers_rows_without_references(run_dir, tmp_path):
    """Seed 001's test file: instruction/input rows, no output; a prompt-only file; messages ending in a user turn."""
    alpaca = tmp_path / "test.json"
    alpaca.write_text(json.dumps([{"instruction": CHATS[3][0], "input": ""}, {"instruction": "", "input": CHATS[4][0]}],
                                 ensure_ascii=False), encoding="utf-8")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": CHATS[0][0]}, {"prompt": CHATS[2][0]}])
    options = GenerationOptions(max_new_tokens=100, greedy=True)
    for path, expected in ((alpaca, [CHATS[3][1], CHATS[4][1]]), (prompts, [CHATS[0][1], CHATS[2][1]])):
        out = tmp_path / f"{path.stem}.out.jsonl"
        assert run_predict(run_dir, None, None, path, out, options, system=SYSTEM, log=lambda *_: None) == {}
        records = read_lines(out)
        assert [r["output"] for r in records] == expected
        assert all(r["reference"] is None for r in records)


def test_predict_rejects_files_it_cannot_answer(tmp_path):
    options = GenerationOptions(greedy=True)
    text = write_jsonl(tmp_path / "notes.jsonl", [{"text": "just prose"}])
    with pytest.raises(FtkitError, match="plain 'text' rows have no prompt"):
        run_predict(tmp_path, None, None, text, tmp_path / "o.jsonl", options)
    ends_with_answer = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "assistant", "content": "hi"}]}])
    with pytest.raises(FtkitError, match="row 1: the conversation does not end with a user turn"):
        run_predict(tmp_path, None, None, ends_with_answer, tmp_path / "o.jsonl", options)
    with pytest.raises(FtkitError, match="no such file"):
        run_predict(tmp_path, None, None, tmp_path / "missing.jsonl", tmp_path / "o.jsonl", options)


def test_scores():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l("a b c d", "a c d e") == pytest.approx(0.75)  # LCS a c d: P = R = 3/4
    assert rouge_l("疑是地上霜", "疑是天上霜") == pytest.approx(0.8)  # one token per CJK character
    assert rouge_l("", "x") == 0.0 and rouge_l("x", "y") == 0.0
    records = [{"row": 1, "output": "Zorb has three moons.", "reference": "Zorb has three moons."},
               {"row": 2, "output": "A cat.", "reference": "A sleepy orange cat guards Byte Island."},
               {"row": 3, "output": "Nothing alike", "reference": "佐布星有三個月亮。"}]
    metrics = score(records)
    assert metrics["exact_match"] == pytest.approx(1 / 3)
    assert 0 < metrics["chrf"] < 100 and 0 < metrics["rouge_l"] < 1
    assert [w["row"] for w in metrics["worst"]] == [3, 2]
