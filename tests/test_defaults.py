"""ftkit's measured defaults (train/defaults.py): padding_free where the model keeps packed samples apart,
gradient checkpointing only where the run would not fit without it. A recipe that sets the key wins."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import yaml

from ftkit.config.recipe import load_recipe
from ftkit.train.run import run_training
from tests.helpers import make_recipe

LLAMA3_8B = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336,
             "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False}


def train(recipe_path, **overrides) -> tuple:
    lines: list[str] = []
    out = run_training(load_recipe(recipe_path, overrides), use_cache=False, log=lines.append)
    return out, lines


def recorded(out) -> dict:
    return yaml.safe_load((out / "ftkit_recipe.yml").read_text(encoding="utf-8"))


@pytest.mark.slow
def test_a_recipe_without_the_keys_gets_padding_free_and_no_checkpointing_on_a_cpu(tiny_model, tmp_path):
    import torch

    path = make_recipe(tmp_path, tiny_model, "defaults", max_steps=2)
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    del raw["gradient_checkpointing"]
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    out, lines = train(path)
    assert "note: gradient checkpointing off (a CPU run: it would slow each step and save little memory; set " \
           "gradient_checkpointing to choose)" in lines
    assert any(line.startswith("note: padding_free on (") for line in lines), lines
    assert recorded(out)["padding_free"] is True and recorded(out)["gradient_checkpointing"] is False
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert args.padding_free is True and not getattr(args, "activation_checkpointing", args.gradient_checkpointing)


@pytest.mark.slow
def test_the_recipe_wins_and_batch_one_stays_padded(tiny_model, tmp_path):
    out, lines = train(make_recipe(tmp_path, tiny_model, "padded", max_steps=1, padding_free=False))
    assert recorded(out)["padding_free"] is False and not any("padding_free" in line for line in lines)
    out, lines = train(make_recipe(tmp_path, tiny_model, "one", max_steps=1, per_device_train_batch_size=1))
    assert "padding_free" not in recorded(out) and not any("padding_free" in line for line in lines)


@pytest.mark.slow
def test_an_architecture_that_leaks_trains_padded_instead_of_failing(tiny_opt, tmp_path):
    """The default never refuses: only an explicit padding_free on such a model is an error (test_packing.py)."""
    out, lines = train(make_recipe(tmp_path, tiny_opt, "opt", max_steps=2, lora_modules_to_save=None))
    assert "padding_free" not in recorded(out) and not any("padding_free" in line for line in lines)
    assert json.loads((out / "train_summary.json").read_text())["global_step"] == 2


@pytest.mark.parametrize("margin_gib, expected", [(-0.5, True), (0.5, False)])
def test_checkpointing_on_a_gpu_only_where_the_run_would_not_fit_without_it(tmp_path, monkeypatch, margin_gib,
                                                                            expected):
    """Decided from the memory model behind `ftkit estimate` against the GPU's memory (a stand-in GPU here)."""
    import torch

    from ftkit.config.memory import CUDA_CONTEXT_GIB, GIB, estimate, setup_from_recipe
    from ftkit.config.precision import GPU_WITH_BF16, training_precision
    from ftkit.train.defaults import resolve_checkpointing

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(LLAMA3_8B))
    recipe = load_recipe(None, raw={"model_name_or_path": str(tmp_path / "model"), "dataset_name": "org/data",
                                    "use_peft": True, "load_in_4bit": True, "per_device_train_batch_size": 4,
                                    "max_length": 2048})
    need = estimate(LLAMA3_8B, setup_from_recipe(recipe))["bytes"]["total_no_checkpointing"]
    total = need + (CUDA_CONTEXT_GIB + margin_gib) * GIB
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(total_memory=total))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    model = SimpleNamespace(config=SimpleNamespace(to_dict=lambda: dict(LLAMA3_8B)))
    lines: list[str] = []
    precision = training_precision(recipe.model, recipe.sft, GPU_WITH_BF16)
    assert resolve_checkpointing(model, recipe, precision, 0, lines.append) is expected
    assert recipe.sft["gradient_checkpointing"] is expected
    assert lines[0].startswith(f"note: gradient checkpointing {'on' if expected else 'off'} (estimated")
