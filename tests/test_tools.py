"""Knowing your setup: `ftkit --version`, `ftkit keys`, `ftkit doctor` and `ftkit init`."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata

import pytest
import yaml

from ftkit import __version__
from ftkit.config.schema import key_table
from tests.helpers import ROOT, ftkit, rows, write_jsonl

LLAMA_8B = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False}


def imported_modules(*args: str, env: dict | None = None, cwd=ROOT) -> set[str]:
    """Top-level packages a CLI command imports (python -X importtime)."""
    import os

    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "ftkit", *args], cwd=cwd, capture_output=True,
                            text=True, env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr[-2000:]
    return {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines() if "|" in line}


def test_version_is_one_line_with_the_stack():
    result = ftkit("--version")
    expected = ", ".join([f"ftkit {__version__}"] + [f"{name} {metadata.version(name)}"
                                                     for name in ("torch", "transformers", "trl", "peft")])
    assert (result.returncode, result.stdout, result.stderr) == (0, expected + "\n", "")


def test_keys_shows_one_key_in_full_and_lists_the_rest():
    one = ftkit("keys", "lora_r")
    assert one.returncode == 0, one.stderr
    assert one.stdout.splitlines() == [
        "lora_r",
        "  owner:   model: ftkit's model keys (all of TRL's ModelConfig), config/arguments.py",
        "  type:    int",
        "  default: 16",
        "",
        "  LoRA rank.",
    ]
    lora = ftkit("keys", "lora_").stdout.splitlines()
    assert lora[0].split() == ["key", "owner", "type", "default", "help"]
    assert lora[1:] and all(line.startswith("lora_") for line in lora[1:])
    assert "lora_dropout            model  float              0.05       Dropout on the LoRA input, in [0, 1)." in lora
    everything = ftkit("keys").stdout.splitlines()
    assert len(everything) == len(key_table()) + 1
    assert {line.split()[0] for line in everything[1:]} == set(key_table())
    report = ftkit("keys", "report_to").stdout  # TRL's key, with the default ftkit gives it
    assert "owner:   SFTConfig" in report and "default: none" in report
    old = ftkit("keys", "warmup_ratio").stdout.splitlines()
    assert old[0] == "warmup_ratio: an older name of warmup_steps (accepted, with a note)" and old[2] == "warmup_steps"
    missing = ftkit("keys", "lerning_rate")
    assert (missing.returncode, missing.stderr.strip()) == (
        2, "ftkit: error: no recipe key matches 'lerning_rate' (did you mean learning_rate, logging_strategy?); "
           "`ftkit keys` lists every key")


def test_a_typo_in_a_recipe_points_at_ftkit_keys(tmp_path):
    recipe = tmp_path / "r.yml"
    recipe.write_text("model_name_or_path: org/model\ndataset_name: org/data\nlora_alpah: 8\nzqxj: 1\n")
    result = ftkit("validate", str(recipe))
    assert result.stderr.splitlines() == [
        f"ftkit: error: {recipe}:3: unknown key 'lora_alpah' (did you mean 'lora_alpha'? see: ftkit keys lora_alpha)",
        f"ftkit: error: {recipe}:4: unknown key 'zqxj' (see: ftkit keys)"]


def test_version_keys_and_doctor_import_nothing_heavy():
    for args in (["--version"], ["keys"], ["keys", "lora_r"]):
        assert not imported_modules(*args) & {"torch", "transformers", "trl", "peft", "datasets"}, args
    doctor = imported_modules("doctor", "--json", env={"HF_HUB_OFFLINE": "1"})
    assert "torch" in doctor and not doctor & {"transformers", "trl", "peft", "datasets", "accelerate"}


def test_doctor_json_for_scripts(tmp_path):
    import os

    result = ftkit("doctor", "--json", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report) == {"ftkit", "python", "packages", "torch", "gpus", "hub", "caches", "capabilities"}
    assert report["ftkit"] == __version__ and report["python"]["version"] == sys.version.split()[0]
    assert report["packages"]["transformers"] == metadata.version("transformers")
    assert report["torch"]["version"] == metadata.version("torch") and isinstance(report["gpus"], list)
    assert report["hub"]["offline_mode"] is True and report["hub"]["reachable"] is None
    assert "token" not in json.dumps(report["hub"]).replace("token_configured", "")  # presence only, never a value
    ftkit_cache = next(c for c in report["caches"] if c["name"] == "ftkit token cache")
    assert ftkit_cache["path"] == os.environ["FTKIT_CACHE"] and ftkit_cache["bytes"] >= 0
    names = [c["name"] for c in report["capabilities"]]
    assert names[:4] == ["GPU training", "bf16", "4-bit QLoRA / 8-bit", "flash_attention_2"]
    assert all(isinstance(c["available"], bool) and c["detail"] for c in report["capabilities"])
    if not report["gpus"]:  # this machine: the lines say what training here means
        gpu = report["capabilities"][0]
        assert gpu["available"] is False and "CPU" in gpu["detail"]
    text = ftkit("doctor", env={"HF_HUB_OFFLINE": "1"})
    assert text.returncode == 0 and "what this means:" in text.stdout and "4-bit QLoRA / 8-bit:" in text.stdout


def test_init_writes_a_commented_recipe_that_validates_and_never_replaces_a_file(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "chats.jsonl", rows())
    out = tmp_path / "starter.yml"
    result = ftkit("init", "--model", str(tiny_model), "--data", str(data), "-o", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert f"# --- data: {data} (messages format, 7 rows)" in text and "# Next: ftkit validate" in text
    recipe = yaml.safe_load(text)
    assert recipe["model_name_or_path"] == str(tiny_model) and recipe["dataset_mixer"] == {str(data): 1.0}
    assert recipe["use_peft"] is True and "load_in_4bit" not in recipe  # a tiny model: plain LoRA fits
    assert ftkit("validate", str(out), cwd=tmp_path).returncode == 0
    again = ftkit("init", "--model", str(tiny_model), "--data", str(data), "-o", str(out), cwd=tmp_path)
    assert (again.returncode, again.stderr.strip()) == (
        2, f"ftkit: error: {out} already exists; ftkit init never replaces a file: choose another --output")
    assert out.read_text() == text


@pytest.mark.parametrize("option", ["--model", "--data"])
def test_init_refuses_an_empty_path(option, tiny_model, tmp_path, capsys):
    from tests.helpers import cli

    data = write_jsonl(tmp_path / "chats.jsonl", rows())
    given = {"--model": str(tiny_model), "--data": str(data), option: " "}
    code, _, err = cli(["init", "--model", given["--model"], "--data", given["--data"], "-o",
                        str(tmp_path / "r.yml")], capsys)
    assert (code, err) == (2, f"ftkit: error: {option} is empty: give a path or a hub name\n")
    assert not (tmp_path / "r.yml").exists()


@pytest.mark.parametrize("gpu, method", [("80", "lora"), ("24", "qlora")])
def test_init_picks_lora_or_qlora_from_the_estimate(gpu, method, tmp_path):
    model = tmp_path / "llama-8b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_8B))
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": f"q{i}?", "answer": f"a{i}."} for i in range(300)])
    out = tmp_path / "r.yml"
    result = ftkit("init", "--model", str(model), "--data", str(data), "-o", str(out), "--gpu-memory", gpu)
    assert result.returncode == 0, result.stderr
    recipe = yaml.safe_load(out.read_text())
    assert recipe.get("load_in_4bit", False) is (method == "qlora")
    assert recipe["dataset_mixture"]["datasets"][0]["columns"] == {"question": "prompt", "answer": "completion"}
    assert recipe["test_split_size"] == 0.05 and recipe["eval_strategy"] == "steps"
    estimate = json.loads(ftkit("estimate", str(out), "--json").stdout)
    assert estimate["bytes"]["total"] / 2**30 <= float(gpu) - 1  # what init promised is what estimate says
