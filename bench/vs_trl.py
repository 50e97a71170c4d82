"""ftkit against a plain hand-written TRL SFTTrainer script (bench/trl_plain.py) on identical settings: random-init
tiny Llama, 16 short chats, LoRA r8 all-linear + embed_tokens/lm_head, batch 4, 200 steps, fp32, one thread each
(OMP_NUM_THREADS=1 and torch.set_num_threads(1)).

    python bench/vs_trl.py [--reps 3] [--steps 200]     # writes bench/results/vs_trl.json

Each run is its own process; the order alternates (ftkit first, then TRL first, ...) so a neighbour's load
falls on both; the figures are medians over --reps. Per run: whole-process wall time, time from process start
to the first optimizer step, ms/step over the steps after the first (first step start -> end of training), and
the time from the end of training to process exit (saving, summaries). ftkit runs through
bench/ftkit_timed.py (the CLI unchanged, timestamps from an import hook) with --no-cache, so it tokenises every
time as TRL does. Also `ftkit --help` and `ftkit validate` wall times.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BENCH = Path(__file__).resolve().parent
STAMP = re.compile(r"BENCH (step_begin|train_end) (\d+) ([\d.]+)(?: threads=(\d+))?")


def chats() -> list[dict]:
    """16 short conversations in the tiny tokenizer's languages."""
    rows = [(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.") for a, b in [(1, 2), (3, 4), (5, 5), (7, 2),
                                                                               (10, 42), (6, 3), (8, 1), (9, 9)]]
    rows += [("What is the capital of France?", "The capital of France is Paris."),
             ("How are you today?", "I am fine, thank you."), ("Write a short poem about the moon.",
                                                               "The moon is light in the river."),
             ("Summarise the text below.", "A model learns from data."),
             ("你好！", "你好！今天天氣很好。"),
             ("請續寫：床前明月光，", "疑是地上霜。"),
             ("北京是哪裡的首都？", "北京是中国的首都。"),
             ("你食咗飯未呀？", "食咗喇，唔該晒！")]
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in rows]


def recipe(model: Path, data: Path, out: Path, steps: int) -> dict:
    return {"model_name_or_path": str(model), "use_peft": True, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
            "lora_target_modules": "all-linear", "lora_modules_to_save": ["embed_tokens", "lm_head"],
            "dataset_mixer": {str(data): 1.0}, "output_dir": str(out), "max_steps": steps,
            "per_device_train_batch_size": 4, "learning_rate": 1e-2, "lr_scheduler_type": "constant",
            "warmup_steps": 0, "weight_decay": 0.0, "gradient_checkpointing": False, "padding_free": False,
            "logging_steps": 10,
            "save_strategy": "no", "report_to": "none", "seed": 0, "bf16": False}


def timed(command: list[str], env: dict, steps: int = 0) -> dict:
    """Wall time of a process, and its BENCH timestamps relative to the moment it was started."""
    started = time.time()
    run = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.time() - started
    if run.returncode != 0:
        raise SystemExit(f"bench: {' '.join(command)} failed ({run.returncode}):\n{run.stderr[-3000:]}")
    stamps, threads = {}, None  # progress bars share stderr without newlines: find the stamps anywhere
    for event, step, when, count in STAMP.findall(run.stderr):
        stamps[f"{event}_{step}" if event == "step_begin" else event] = float(when)
        threads = int(count) if count else threads
    result = {"wall_s": round(wall, 3)}
    if stamps:
        result.update(first_step_s=round(stamps["step_begin_0"] - started, 3), threads=threads,
                      ms_per_step=round(1000 * (stamps["train_end"] - stamps["step_begin_1"]) / (steps - 1), 2),
                      after_training_s=round(started + wall - stamps["train_end"], 3))
    return result


def median_of(runs: list[dict]) -> dict:
    return {key: round(statistics.median(r[key] for r in runs), 3) for key in runs[0] if key != "threads"}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", type=Path, default=common.ROOT / "bench" / "results" / "vs_trl.json")
    args = parser.parse_args(argv)
    machine = common.machine()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    runs: dict[str, list[dict]] = {"ftkit": [], "trl": [], "ftkit --help": [], "ftkit validate": []}
    with tempfile.TemporaryDirectory(prefix="ftkit-vs-trl-") as tmp_name:
        tmp = Path(tmp_name)
        env["FTKIT_CACHE"] = str(tmp / "cache")
        model = common.build_tiny_model(tmp / "tiny", max_positions=1024)
        data = tmp / "chats.jsonl"
        data.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in chats()), encoding="utf-8")
        commands = {
            "ftkit": lambda i: [sys.executable, str(BENCH / "ftkit_timed.py"), "train", str(common.write_recipe(
                tmp / f"ftkit{i}.yml", **recipe(model, data, tmp / f"ftkit{i}", args.steps))), "--no-cache"],
            "trl": lambda i: [sys.executable, str(BENCH / "trl_plain.py"), str(model), str(data), str(tmp / f"trl{i}"),
                              str(args.steps)],
        }
        for rep in range(args.reps):
            for name in (("ftkit", "trl") if rep % 2 == 0 else ("trl", "ftkit")):
                runs[name].append(timed(commands[name](rep), env, args.steps))
                print(f"rep {rep + 1} {name}: {runs[name][-1]}", flush=True)
            runs["ftkit --help"].append(timed([sys.executable, "-m", "ftkit", "--help"], env))
            validate = [sys.executable, "-m", "ftkit", "validate", str(tmp / "ftkit0.yml")]
            runs["ftkit validate"].append(timed(validate, env))
    result = {
        "what": "ftkit train vs a hand-written TRL SFTTrainer script, same run (bench/vs_trl.py)",
        "command": "python bench/vs_trl.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {"model": "tiny random-init Llama (scripts/make_tiny_model.py), fp32", "chats": len(chats()),
                     "lora": "r8 alpha16 all-linear + embed_tokens/lm_head", "batch": 4, "steps": args.steps,
                     "threads": 1, "repetitions": args.reps, "order": "alternated, ftkit first in odd repetitions"},
        "machine": {**machine, "load_average_end": common.load_average()},
        "median": {name: median_of(r) for name, r in runs.items()},
        "runs": runs,
    }
    common.write_result(args.out, result)
    print(json.dumps(result["median"], indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
