"""Shared fixtures: the tiny model (built once per session, offline) and an isolated token cache."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "tiny"
    build = runpy.run_path(str(ROOT / "scripts" / "make_tiny_model.py"))["build"]
    build(out)
    return out


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FTKIT_CACHE", str(tmp_path_factory.getbasetemp() / "ftkit-cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def ftkit(*args: str, cwd: Path = ROOT, env: dict | None = None, unset: tuple = ()) -> subprocess.CompletedProcess:
    """Run the real console entry point, as a user would."""
    environment = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in unset}
    return subprocess.run([sys.executable, "-m", "ftkit", *args], cwd=cwd, capture_output=True, text=True,
                          env=environment, timeout=600)


@pytest.fixture(scope="session")
def trained_run(tiny_model, tmp_path_factory) -> Path:
    """One LoRA run of tests/test_train.py's conversations, memorised; shared read-only by the modules that
    use a trained model (chat, predict, merge, serve)."""
    from ftkit.recipe import load_recipe
    from ftkit.train import run_training
    from tests.test_train import make_recipe

    tmp = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FTKIT_CACHE", str(tmp / "cache"))
        mp.setenv("WANDB_MODE", "disabled")
        return run_training(load_recipe(make_recipe(tmp, tiny_model, "run")), log=lambda *_: None)
