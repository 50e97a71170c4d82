"""GPU training efficiency of ftkit: LoRA bf16, QLoRA nf4 and full fine-tuning of a random-init ~1.1B Llama
(TinyLlama's shape, built here: no hub), each with sdpa, flash_attention_2 (if flash_attn imports) and
padding-free batches; tokens/s, MFU and peak memory beside `ftkit estimate`. Run it through bench/gpu.sh.

    bash bench/gpu.sh              # CUDA machine: writes bench/results/gpu-<device>.json
    bash bench/gpu.sh --dry-run    # CPU, tiny model, 2 steps per case: checks the script (CI)

MFU = 6 x parameters x real (non-pad) tokens/s (steps after the first) / the GPU's peak dense bf16 FLOPS
(table below; "unknown" for other GPUs); 6N per token leaves out attention's own FLOPs and counts the frozen
weights of LoRA/QLoRA as if trained, the usual convention. Peak memory is torch.cuda.max_memory_allocated
(train_summary.json's peak_memory_mb), beside `ftkit estimate --json`'s total, which assumes every batch is
batch x max_length tokens; each case reports max_tokens_in_a_batch so the two can be compared.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, TFLOPS; first match wins.
PEAK_BF16_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
                    ("A100", 312.0), (r"\bL4\b", 121.0), ("4090", 165.2)]
METHODS = {
    "lora_bf16": {"use_peft": True, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
                  "lora_target_modules": "all-linear", "learning_rate": 1e-4},
    "qlora_nf4": {"use_peft": True, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
                  "lora_target_modules": "all-linear", "learning_rate": 1e-4, "load_in_4bit": True,
                  "bnb_4bit_quant_type": "nf4"},
    "full": {"use_peft": False, "learning_rate": 1e-5},
}


def peak_tflops(device: str) -> float | None:
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device):
            return tflops
    return None


def detect(dry_run: bool) -> dict:
    """GPU name and whether flash_attn imports, asked in a child process so this one never holds a CUDA context."""
    if dry_run:
        flash = importlib.util.find_spec("flash_attn") is not None
        return {"cuda": False, "device": "cpu-dry-run", "flash_attn": flash}
    probe = ("import json, torch\ntry:\n    import flash_attn  # noqa\n    flash = True\nexcept Exception:\n"
             "    flash = False\nprint(json.dumps({'cuda': torch.cuda.is_available(), 'device': "
             "torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu', 'flash_attn': flash}))")
    found = json.loads(subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                                      text=True).stdout.strip().splitlines()[-1])
    if not found["cuda"]:
        raise SystemExit("bench/gpu.sh: no CUDA GPU visible to torch; run `bash bench/gpu.sh --dry-run` to check "
                         "the script on a CPU")
    return found


def cases(flash: bool) -> dict[str, dict | str]:
    """method/attention -> recipe keys, or the reason the case cannot run here."""
    attention: dict[str, dict | str] = {
        "sdpa": {"attn_implementation": "sdpa", "padding_free": False},
        "flash_attention_2": {"attn_implementation": "flash_attention_2", "padding_free": False} if flash
        else "skipped: flash_attn is not importable",
        "padding_free": {"attn_implementation": "flash_attention_2" if flash else "sdpa", "padding_free": True},
        "packing_bfd": {"attn_implementation": "flash_attention_2" if flash else "sdpa", "packing": True},
        "sdpa_checkpointing": {"attn_implementation": "sdpa", "gradient_checkpointing": True, "padding_free": False},
    }
    return {f"{method}/{attn}": (keys if isinstance(keys, str) else {**METHODS[method], **keys})
            for method in METHODS for attn, keys in attention.items()}


def selected(all_cases: dict, patterns: str | None) -> dict:
    if not patterns:
        return all_cases
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = {name: keys for name, keys in all_cases.items() if any(fnmatch.fnmatch(name, p) for p in wanted)}
    if not chosen:
        raise SystemExit(f"bench/gpu.sh: --cases {patterns!r} matches none of: {', '.join(all_cases)}")
    return chosen


def build_model(tmp: Path, dry_run: bool) -> Path:
    if dry_run:
        return common.build_tiny_model(tmp / "tiny", max_positions=2048)
    from estimate_gpu import build_model as build_1b  # random-init TinyLlama shape with the tiny tokenizer

    build_1b(tmp / "model", dry_run=False)
    config = tmp / "model" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_max_length": 2048}, indent=2))
    return tmp / "model"


def estimate(recipe_path: Path) -> dict | None:
    """`ftkit estimate --json`, in this process (it imports nothing heavy)."""
    from ftkit.commands.estimate import run_estimate
    from ftkit.config.recipe import load_recipe
    from ftkit.errors import FtkitError

    try:
        return run_estimate(load_recipe(recipe_path), as_json=True, echo=lambda *_: None)
    except FtkitError:
        return None


def figures(result: dict, est: dict | None, peak: float | None) -> dict:
    """MFU and the estimate beside the measured peak, for a case that trained."""
    extra: dict = {"estimate_gib": round(est["bytes"]["total"] / 2**30, 3) if est else None,
                   "estimate_tokens_per_batch": est["tokens_per_batch"] if est else None,
                   "parameters": est["parameters"] if est else None}
    if result["status"] != "ok":
        return extra
    extra["measured_peak_gib"] = round(result["peak_memory_mb"] / 1024, 3)
    if est and extra["measured_peak_gib"]:
        extra["estimate_over_measured"] = round(extra["estimate_gib"] / extra["measured_peak_gib"], 3)
    flops = 6 * extra["parameters"] * result["real_tokens_per_s"] if est else None
    extra["achieved_tflops"] = round(flops / 1e12, 2) if flops else None
    extra["mfu"] = round(flops / (peak * 1e12), 4) if flops and peak else "unknown"
    return extra


def run_cases(planned: dict[str, Path | str], tmp: Path, one_process: bool, done=lambda results: None) -> dict:
    """Each case in turn; `done(results so far)` after each, so a run cut short still leaves its figures."""
    import measure

    results: dict[str, dict] = {}
    for name, plan in planned.items():
        if isinstance(plan, str):
            results[name] = {"status": plan}
        elif one_process:
            results[name] = measure.measure(plan, log=lambda *_: None)
        else:  # a process per case: its peak memory is its own, an out-of-memory case cannot disturb the next
            out = tmp / f"{name.replace('/', '_')}.json"
            run = subprocess.run([sys.executable, measure.__file__, str(plan), "--out", str(out)],
                                 capture_output=True, text=True)
            tail = (run.stderr.strip().splitlines() or ["no output"])[-1]
            results[name] = json.loads(out.read_text())[0] if out.is_file() else {"status": f"error: {tail}"}
        print(f"  {name}: {results[name]['status']}", flush=True)
        done(results)
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, 2 steps per case, no CUDA")
    parser.add_argument("--steps", type=int, help="steps per case (default 20; dry run 2)")
    parser.add_argument("--batch", type=int, help="per_device_train_batch_size (default 4; dry run 2)")
    parser.add_argument("--max-length", type=int, help="max_length (default 2048; dry run 256)")
    parser.add_argument("--rows", type=int, help="synthetic chats (default 256; dry run 16)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="train every case with it on")
    parser.add_argument("--cases", help="comma-separated method/attention patterns to run, e.g. 'lora_bf16/*,full/sdpa' "
                        "(default: all)")
    parser.add_argument("--out", type=Path, help="result file (default bench/results/gpu-<device>.json)")
    args = parser.parse_args(argv)
    for key, real, dry in (("steps", 20, 2), ("batch", 4, 2), ("max_length", 2048, 256), ("rows", 256, 16)):
        if getattr(args, key) is None:
            setattr(args, key, dry if args.dry_run else real)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path even on a GPU machine
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    found = detect(args.dry_run)
    machine = common.machine()
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="ftkit-gpu-bench-") as tmp_name:
        tmp = Path(tmp_name)
        model = build_model(tmp, args.dry_run)
        data = tmp / "chats.jsonl"
        tokenizer = AutoTokenizer.from_pretrained(model)
        stats = common.write_data(data, tokenizer, args.rows, max_tokens=min(common.MAX_TOKENS, args.max_length))
        planned: dict[str, Path | str] = {}
        estimates = {}
        for name, keys in selected(cases(found["flash_attn"]), args.cases).items():
            if isinstance(keys, str):
                planned[name] = keys
                continue
            settings = {"per_device_train_batch_size": args.batch, "max_length": args.max_length,
                        "max_steps": args.steps, "logging_steps": args.steps,
                        "gradient_checkpointing": args.gradient_checkpointing, **keys}
            recipe = common.lora_recipe(model, data, tmp / "runs" / name.replace("/", "_"), **settings)
            if not recipe["use_peft"]:
                recipe = {k: v for k, v in recipe.items() if not k.startswith("lora_")}
            planned[name] = common.write_recipe(tmp / f"{name.replace('/', '_')}.yml", **recipe)
            estimates[name] = estimate(planned[name])
        print(f"{len(planned)} cases on {found['device']}, {args.steps} steps each", flush=True)
        write = lambda results: report(args, argv, found, machine, stats, results, estimates)  # noqa: E731
        out = write(run_cases(planned, tmp, one_process=args.dry_run, done=write))
    result = json.loads(out.read_text())
    print(summary_table(result["cases"]))
    print(f"wrote {out}")
    return result


def report(args: argparse.Namespace, argv: list[str] | None, found: dict, machine: dict, stats: dict,
           results: dict[str, dict], estimates: dict) -> Path:
    """Write bench/results/gpu-<device>.json (or --out) with the cases measured so far."""
    peak = peak_tflops(found["device"])
    result = {
        "what": "ftkit on one GPU: LoRA bf16, QLoRA nf4, full fine-tuning x sdpa / flash_attention_2 / padding-free "
                "/ packing / gradient checkpointing (bench/gpu.sh)",
        "command": "bash bench/gpu.sh " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": found["device"], "dry_run": args.dry_run, "peak_bf16_tflops": peak if peak else "unknown",
        "machine": {**machine, "load_average_end": common.load_average()},
        "settings": {"model": "tiny (dry run)" if args.dry_run else "random-init Llama, TinyLlama-1.1B shape",
                     "steps": args.steps, "per_device_train_batch_size": args.batch, "max_length": args.max_length,
                     "gradient_checkpointing": args.gradient_checkpointing},
        "data": stats,
        "cases": {name: {**results[name], **figures(results[name], estimates.get(name), peak)} for name in results},
    }
    slug = re.sub(r"[^a-z0-9]+", "-", found["device"].lower()).strip("-")
    return common.write_result(args.out or common.ROOT / "bench" / "results" / f"gpu-{slug}.json", result)


def summary_table(rows: dict[str, dict]) -> str:
    lines = [f"{'case':<32}{'tok/s':>10}{'MFU':>8}{'peak GiB':>10}{'estimate':>10}"]
    for name, r in rows.items():
        if r["status"] != "ok":
            lines.append(f"{name:<32}{r['status']}")
            continue
        mfu = f"{r['mfu']:.1%}" if isinstance(r["mfu"], float) else r["mfu"]
        est = f"{r['estimate_gib']:.2f}" if r["estimate_gib"] is not None else "-"
        lines.append(f"{name:<32}{r['real_tokens_per_s']:>10,.0f}{mfu:>8}{r['measured_peak_gib']:>10.2f}{est:>10}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
