"""Shared fixtures: the tiny model (built once per session, offline) and an isolated token cache."""

from __future__ import annotations

import os

# One OpenMP thread per process: the tiny model gains nothing from more, and with other jobs on the cores
# (the 2-process tests, a busy CI machine) oversubscribed threads spin-wait and slow training many times over.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import runpy  # noqa: E402
from pathlib import Path

import pytest

from tests.helpers import ROOT


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "tiny"
    build = runpy.run_path(str(ROOT / "scripts" / "make_tiny_model.py"))["build"]
    build(out)
    return out


@pytest.fixture(scope="session")
def family_model(tmp_path_factory):
    """family -> the tiny model dressed as that family (qwen3, qwen2_5, llama3_1): its tokens and TRL's copy of its
    real chat template (scripts/make_tiny_model.py --family); each built once per session."""
    built: dict[str, Path] = {}
    build = runpy.run_path(str(ROOT / "scripts" / "make_tiny_model.py"))["build"]

    def get(family: str) -> Path:
        if family not in built:
            built[family] = tmp_path_factory.mktemp("models") / f"tiny-{family}"
            build(built[family], family=family)
        return built[family]

    return get


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FTKIT_CACHE", str(tmp_path_factory.getbasetemp() / "ftkit-cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")


@pytest.fixture(scope="session")
def trained_run(tiny_model, tmp_path_factory) -> Path:
    """One LoRA run of tests/test_train.py's conversations, memorised; shared read-only by the modules that
    use a trained model (chat, predict, merge, serve)."""
    from ftkit.config.recipe import load_recipe
    from ftkit.train.run import run_training
    from tests.helpers import make_recipe

    tmp = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FTKIT_CACHE", str(tmp / "cache"))
        mp.setenv("WANDB_MODE", "disabled")
        return run_training(load_recipe(make_recipe(tmp, tiny_model, "run")), log=lambda *_: None)


@pytest.fixture
def tiny_opt(tiny_model, tmp_path):
    """The tiny model's tokenizer on a tiny OPT, an architecture whose mask ignores position_ids."""
    import shutil

    from transformers import OPTConfig, OPTForCausalLM

    out = tmp_path / "tiny-opt"
    OPTForCausalLM(OPTConfig(vocab_size=1024, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                             word_embed_proj_dim=64, pad_token_id=3, bos_token_id=0, eos_token_id=0)).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_model / name, out / name)
    return out
