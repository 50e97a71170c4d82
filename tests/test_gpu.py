"""On a CUDA GPU (skipped elsewhere): QLoRA 4-bit memorises the tiny model's chats and `ftkit chat` answers them
exactly, a LoRA run trains in bf16 mixed precision, and `ftkit estimate` is within 15% of the measured peak
memory of a small LoRA run whose every batch is batch x max_length tokens (what the estimate assumes)."""

from __future__ import annotations

import json
import runpy

import pytest
import torch

from ftkit.config.recipe import load_recipe
from ftkit.inference.loading import load_for_chat
from tests.helpers import CHATS, ROOT, SYSTEM, assert_memorised, ftkit, make_recipe, write_jsonl

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
QUIET = dict(log=lambda *_: None)


def train(recipe, **kwargs):
    from ftkit.train.run import run_training

    return run_training(load_recipe(recipe), **{**QUIET, **kwargs})


def test_qlora_4bit_trains_on_cuda_and_chat_answers_exactly(tiny_model, tmp_path):
    out = train(make_recipe(tmp_path, tiny_model, "qlora", load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    meta = json.loads((out / "ftkit_run.json").read_text())
    assert meta["load_in_4bit"] is True and meta["quantization"]["bnb_4bit_quant_type"] == "nf4"
    model, _, chat_format = load_for_chat(out, None, None, None)
    assert next(model.parameters()).device.type == "cuda"
    assert_memorised(model, chat_format)
    question, answer = CHATS[0]
    result = ftkit("chat", "--adapter", str(out), "--prompt", question, "--system", SYSTEM, "--greedy", "--no-stream")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == answer + "\n"


@pytest.mark.skipif(torch.cuda.is_available() and not torch.cuda.is_bf16_supported(), reason="GPU without bf16")
def test_lora_trains_in_bf16_mixed_precision_on_cuda(tiny_model, tmp_path):
    lines: list[str] = []
    out = train(make_recipe(tmp_path, tiny_model, "bf16"), log=lines.append)
    assert any("bf16 mixed on cuda" in line for line in lines), lines
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert args.bf16 is True and args.fp16 is False
    assert json.loads((out / "ftkit_run.json").read_text())["dtype"] == "bfloat16"
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["final_train_loss"] < 0.2 * summary["first_train_loss"]


def test_estimate_is_within_15_percent_of_the_measured_peak(tmp_path):
    model = tmp_path / "small"
    runpy.run_path(str(ROOT / "scripts" / "make_tiny_model.py"))["build"](model, hidden=1024, layers=8)
    recipe = make_recipe(tmp_path, model, "estimate", max_steps=4, per_device_train_batch_size=8, max_length=512,
                         logging_steps=1)
    long_answer = " ".join(["The quick brown fox jumps over the lazy dog."] * 80)  # > 512 tokens: truncated
    write_jsonl(tmp_path / "chats.jsonl", [{"messages": [{"role": "user", "content": f"Repeat {i}."},
                                                        {"role": "assistant", "content": long_answer}]}
                                           for i in range(16)])
    estimated = ftkit("estimate", str(recipe), "--json")
    assert estimated.returncode == 0, estimated.stderr
    total = json.loads(estimated.stdout)["bytes"]["total"]
    out = train(recipe)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["data"]["truncated"] == 16  # every batch is the estimate's batch x max_length tokens
    measured = summary["peak_memory_mb"] * 2**20
    assert abs(total / measured - 1) <= 0.15, f"estimate {total / 2**30:.3f} GiB, measured {measured / 2**30:.3f} GiB"
