"""Preprocessing speed: 100k synthetic multi-turn conversations, first (tokenising) and cached run.

    python bench/preprocess.py [--rows 100000] [--workers 2]   # writes bench/results/preprocess.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import runpy
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the model learns from data one token at a time 模型 数据 训练 一个 问题 回答 香港 飲茶".split()


def synthetic_rows(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def text(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    rows = []
    for _ in range(count):
        messages = [{"role": "system", "content": text(8)}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 3)):
            messages += [{"role": "user", "content": text(rng.randint(5, 30))},
                         {"role": "assistant", "content": text(rng.randint(10, 80))}]
        rows.append({"messages": messages})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["FTKIT_CACHE"] = str(tmp / "cache")
        runpy.run_path(str(ROOT / "scripts" / "make_tiny_model.py"))["build"](tmp / "tiny")
        data = tmp / "data.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in synthetic_rows(args.rows)))
        from ftkit.data.pipeline import build_datasets
        from ftkit.train.model import load_tokenizer
        from ftkit.config.recipe import load_recipe

        recipe = load_recipe(None, raw={"model_name_or_path": str(tmp / "tiny"), "dataset_mixer": {str(data): 1.0},
                                        "preprocessing_num_workers": args.workers, "max_length": 1024})
        _, chat_format, _ = load_tokenizer(recipe.model, None, log=lambda *_: None)
        timings = {}
        for run in ("first", "cached"):
            started = time.perf_counter()
            prepared = build_datasets(recipe, chat_format, log=lambda *_: None)
            timings[run] = time.perf_counter() - started
    import torch

    result = {
        "what": f"{args.rows:,} synthetic conversations (1-3 exchanges, 30% with system), ChatML, tiny BPE tokenizer",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "workers": args.workers,
        "first_run_s": round(timings["first"], 1),
        "first_run_conversations_per_s": round(args.rows / timings["first"]),
        "cached_run_s": round(timings["cached"], 2),
        "tokens": prepared.stats.tokens,
    }
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "preprocess.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
