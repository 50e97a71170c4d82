"""The bench scripts' CPU paths run and write what they promise, so the GPU script is checked without a GPU:
`bench/gpu.sh --dry-run` (tiny model, 2 steps per case) and `bench/train_throughput.py` on a tiny setting."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

METHODS, ATTENTION = ("lora_bf16", "qlora_nf4", "full"), ("sdpa", "flash_attention_2", "padding_free", "packing_bfd",
                                                                  "sdpa_checkpointing")


def run(command: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, **env})


def assert_sane(case: dict) -> None:
    assert case["status"] == "ok", case["status"]
    assert case["real_tokens_per_s"] > 0 and case["loss_tokens_per_s"] > 0 and case["mean_step_ms"] > 0
    assert 0 <= case["padding_fraction"] < 1
    assert case["pad_tokens"] + case["real_tokens"] == case["tokens_seen"] > 0
    assert case["peak_memory_mb"] > 0


@pytest.mark.slow
def test_gpu_script_dry_run_trains_each_method_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    result = run(["bash", "bench/gpu.sh", "--dry-run", "--out", str(out)], BENCH_PYTHON=sys.executable)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] is True and report["device"] == "cpu-dry-run" and report["peak_bf16_tflops"] == "unknown"
    assert set(report["cases"]) == {f"{m}/{a}" for m in METHODS for a in ATTENTION}
    for method in METHODS:
        case = report["cases"][f"{method}/sdpa"]
        assert_sane(case)
        assert case["steps"] == 2 and case["device"] == "cpu" and case["attn_implementation"] == "sdpa"
        assert case["mfu"] == "unknown" and case["estimate_gib"] > 0 and case["measured_peak_gib"] > 0
    assert report["cases"]["qlora_nf4/sdpa"]["quantization"]["bnb_4bit_quant_type"] == "nf4"
    assert report["cases"]["full/sdpa"]["quantization"] is None
    # a case that cannot run here says why in one line instead of stopping the others
    statuses = [case["status"] for case in report["cases"].values()]
    assert all(s == "ok" or s.startswith(("refused: ", "skipped: ")) for s in statuses), statuses
    assert all("\n" not in s for s in statuses)


@pytest.mark.slow
def test_train_throughput_counts_padding_and_reports_refusals(tmp_path):
    out = tmp_path / "throughput.json"
    result = run([sys.executable, "bench/train_throughput.py", "--rows", "12", "--steps", "3", "--max-length", "256",
                  "--batch", "2", "--modes", "padded,padded_ckpt,packing_wrapped", "--one-process", "--out", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    data = report["data"]
    assert data["lengths_as_generated"] is True and 20 <= data["min"] <= data["max"] <= 256
    padded, ckpt = report["modes"]["padded"], report["modes"]["padded_ckpt"]
    assert_sane(padded)
    assert_sane(ckpt)
    assert padded["steps"] == ckpt["steps"] == padded["batches"] == 3 and padded["mean_rows_per_batch"] == 2
    assert (padded["gradient_checkpointing"], ckpt["gradient_checkpointing"]) == (False, True)
    assert padded["pad_tokens"] > 0  # skewed lengths in batches of 2: the shorter chat of a pair is padded
    assert ckpt["tokens_seen"] == padded["tokens_seen"] and ckpt["pad_tokens"] == padded["pad_tokens"]
    # 'wrapped' packing lets samples attend to the ones before them: ftkit refuses it (before and after packing
    # on sdpa), and the bench reports the refusal as one line instead of crashing
    wrapped = report["modes"]["packing_wrapped"]["status"]
    assert wrapped.startswith("refused: ") and "packing" in wrapped and "\n" not in wrapped


@pytest.mark.slow
def test_gpu_profile_dry_run_profiles_ftkit_and_plain_trl(tmp_path):
    out = tmp_path / "profile"
    result = run([sys.executable, "bench/gpu_profile.py", "--dry-run", "--steps", "7", "--variants",
                  "ftkit_lora,trl_lora", "--out-dir", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    for variant in ("ftkit_lora", "trl_lora"):
        assert "error" not in summary[variant], summary[variant]
        assert len(summary[variant]["step_s"]) == 2 and summary[variant]["median_step_s"] > 0  # steps 1 and 2
        table = (out / f"{variant}.txt").read_text()
        assert "aten::mm" in table and "Self CPU" in table
