"""Training throughput per batching mode: padded batches, padding_free, packing with each TRL packing_strategy
(bfd, bfd_split, wrapped), gradient checkpointing on and off, on synthetic chats with skewed lengths.

    python bench/train_throughput.py                  # tiny model on this CPU, a few minutes
    python bench/train_throughput.py --reps 3         # medians of 3, order reversed every other repetition
    python bench/train_throughput.py --model DIR --rows 4000 --steps 50 --max-length 4096 \
        --set attn_implementation=flash_attention_2   # a real model on a GPU

Each mode trains through ftkit (`run_training` on a generated LoRA recipe; bench/measure.py), by default in
its own process so peak memory is the mode's own. Reported per mode: real (non-pad) tokens/s and tokens/s
that carry loss, both over the steps after the first (the first pays for lazy initialisation), ftkit's own
tokens/s (train_summary.json: every token the model saw, pads included, over the whole train loop), padding
fraction (pad tokens / all tokens in the batches the model saw), mean step time after the first step, peak
memory (CPU: max RSS; CUDA: torch.cuda.max_memory_allocated). A mode ftkit refuses reads
"refused: <its error line>". Chats: lognormal lengths (median 250 tokens, sigma 1), clipped to 20-2,000 (and
to --max-length), written with single-token words so each chat's token count is known. Writes
bench/results/train_throughput-<device>.json (or --out).
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MODES = {
    "padded": {"padding_free": False},
    "padded_ckpt": {"gradient_checkpointing": True, "padding_free": False},
    "ftkit_defaults": {},  # neither key set: ftkit decides (padding_free on where the model keeps samples apart)
    "padding_free": {"padding_free": True},
    "packing_bfd": {"packing": True, "packing_strategy": "bfd"},
    "packing_bfd_split": {"packing": True, "packing_strategy": "bfd_split"},
    "packing_wrapped": {"packing": True, "packing_strategy": "wrapped"},
    "packing_bfd_ckpt": {"packing": True, "packing_strategy": "bfd", "gradient_checkpointing": True},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model directory (default: the tiny model, built here)")
    parser.add_argument("--rows", type=int, default=128, help="synthetic chats (default 128)")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per mode (default 6)")
    parser.add_argument("--max-length", type=int, default=2048, help="recipe max_length (default 2048)")
    parser.add_argument("--batch", type=int, default=4, help="per_device_train_batch_size (default 4)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads per run (0: leave as set)")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="extra recipe key for every mode (YAML value), e.g. attn_implementation=sdpa")
    parser.add_argument("--reps", type=int, default=1,
                        help="repetitions, order reversed every other one; figures are medians (default 1)")
    parser.add_argument("--one-process", action="store_true",
                        help="run every mode in this process (faster start; peak memory is then the process's so far)")
    parser.add_argument("--out", type=Path, help="result file (default bench/results/train_throughput-<device>.json)")
    args = parser.parse_args(argv)
    unknown = [m for m in args.modes.split(",") if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    return args


def extra_keys(pairs: list[str]) -> dict:
    import yaml

    keys = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set {pair}: expected KEY=VALUE")
        keys[key] = yaml.safe_load(value)
    return keys


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def run_modes(recipes: dict[str, Path], tmp: Path, threads: int, one_process: bool) -> dict[str, dict]:
    """bench/measure.py per mode, each in a fresh process (or all here with --one-process)."""
    import measure

    if one_process:
        measure.pin_threads(threads)
        return {name: measure.measure(path, log=lambda *_: None) for name, path in recipes.items()}
    results = {}
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    for name, path in recipes.items():
        out = tmp / f"{name}.result.json"
        command = [sys.executable, str(Path(measure.__file__)), str(path), "--out", str(out)]
        run = subprocess.run(command + (["--threads", str(threads)] if threads else []), capture_output=True,
                             text=True, env=env)
        if run.returncode != 0 or not out.is_file():
            tail = (run.stderr.strip().splitlines() or ["no output"])[-1]
            results[name] = {"status": f"error: exit {run.returncode}: {tail}"}
        else:
            results[name] = json.loads(out.read_text())[0]
        out.unlink(missing_ok=True)
        print(f"  {name}: {results[name]['status']}", flush=True)
    return results


TIMED = ("real_tokens_per_s", "loss_tokens_per_s", "ftkit_tokens_per_s", "mean_step_ms", "first_step_ms",
         "train_runtime_s", "peak_memory_mb")


def combine(runs: list[dict]) -> dict:
    """Medians of the timed figures over repetitions; the counts are the same in every repetition."""
    failed = [r for r in runs if r["status"] != "ok"]
    if failed or len(runs) == 1:
        return failed[0] if failed else runs[0]
    out = {**runs[0], "repetitions": len(runs)}
    for key in TIMED:
        out[key] = round(statistics.median(r[key] for r in runs), 1)
    out["real_tokens_per_s_each"] = [r["real_tokens_per_s"] for r in runs]
    return out


def repeat(recipes: dict[str, Path], tmp: Path, args: argparse.Namespace) -> dict[str, dict]:
    runs: dict[str, list[dict]] = {name: [] for name in recipes}
    for rep in range(args.reps):
        order = list(recipes) if rep % 2 == 0 else list(reversed(recipes))
        for name, result in run_modes({n: recipes[n] for n in order}, tmp, args.threads, args.one_process).items():
            runs[name].append(result)
    return {name: combine(results) for name, results in runs.items()}


def table(modes: dict[str, dict]) -> str:
    lines = [f"{'mode':<20}{'real tok/s':>12}{'loss tok/s':>12}{'padding':>9}{'step ms':>10}{'peak MB':>10}"]
    for name, r in modes.items():
        if r["status"] != "ok":
            lines.append(f"{name:<20}{r['status']}")
            continue
        lines.append(f"{name:<20}{r['real_tokens_per_s']:>12,.0f}{r['loss_tokens_per_s']:>12,.0f}"
                     f"{r['padding_fraction']:>9.1%}{r['mean_step_ms']:>10,.1f}{r['peak_memory_mb']:>10,.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    extra = extra_keys(args.extra)
    machine = common.machine()
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="ftkit-bench-") as tmp_name:
        tmp = Path(tmp_name)
        model = args.model or common.build_tiny_model(tmp / "tiny", max_positions=args.max_length)
        tokenizer = AutoTokenizer.from_pretrained(model)
        data = tmp / "chats.jsonl"
        stats = common.write_data(data, tokenizer, args.rows, max_tokens=min(common.MAX_TOKENS, args.max_length))
        recipes = {}
        for name in args.modes.split(","):
            keys = common.lora_recipe(model, data, tmp / "runs" / name, per_device_train_batch_size=args.batch,
                                      max_length=args.max_length, max_steps=args.steps, logging_steps=args.steps,
                                      **extra, **MODES[name])
            recipes[name] = common.write_recipe(tmp / f"{name}.yml", **keys)
        device = device_name()
        print(f"training {len(recipes)} mode(s), {args.steps} steps each, on {device}", flush=True)
        modes = repeat(recipes, tmp, args)
    result = {
        "what": "ftkit LoRA training throughput per batching mode (bench/train_throughput.py)",
        "command": "python bench/train_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": device, "machine": {**machine, "load_average_end": common.load_average()},
        "settings": {"model": str(args.model or "tiny (scripts/make_tiny_model.py)"), "rows": args.rows,
                     "steps": args.steps, "max_length": args.max_length, "per_device_train_batch_size": args.batch,
                     "threads": args.threads or None, "one_process": args.one_process, "repetitions": args.reps,
                     "extra_recipe_keys": extra},
        "data": stats,
        "modes": {name: {"recipe_keys": MODES[name], **modes[name]} for name in modes},
    }
    out = args.out or common.ROOT / "bench" / "results" / f"train_throughput-{slug(device)}.json"
    common.write_result(out, result)
    print(table(result["modes"]))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
