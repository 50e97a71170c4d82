"""Compare `ftkit estimate` with torch.cuda.max_memory_allocated on a real GPU: a random-init ~1.1B Llama
(TinyLlama's shape) trained for a few steps by `ftkit train` with LoRA and QLoRA, gradient checkpointing on
and off, every batch exactly per_device_train_batch_size x max_length tokens.

    python bench/estimate_gpu.py            # needs a CUDA GPU; writes bench/results/estimate_gpu.json
    python bench/estimate_gpu.py --dry-run  # estimates only (no GPU), to check the script

train_summary.json's peak_memory_mb is torch.cuda.max_memory_allocated (what the estimate's total models;
the CUDA context and the allocator's cache come on top).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)
BATCH, LENGTH, STEPS = 4, 512, 6
CASES = {
    "lora_bf16_ckpt": {"use_peft": True, "gradient_checkpointing": True},
    "lora_bf16_no_ckpt": {"use_peft": True, "gradient_checkpointing": False},
    "qlora_nf4_ckpt": {"use_peft": True, "load_in_4bit": True, "gradient_checkpointing": True},
    "qlora_nf4_no_ckpt": {"use_peft": True, "load_in_4bit": True, "gradient_checkpointing": False},
}


def build_model(out: Path, dry_run: bool) -> None:
    """The tiny model's tokenizer (ids < 1024 are all the data uses) with a ~1.1B random-init Llama."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_tiny_model import build

    build(out / "tok")
    out.mkdir(exist_ok=True)
    for name in (out / "tok").iterdir():
        if name.name not in ("model.safetensors", "config.json"):
            (out / name.name).write_bytes(name.read_bytes())
    config = json.loads((out / "tok" / "config.json").read_text())
    config.update(SHAPE, dtype="bfloat16")
    (out / "config.json").write_text(json.dumps(config))
    if dry_run:
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out), dtype=torch.bfloat16)
    model.save_pretrained(out)


def write_recipe(tmp: Path, model: Path, name: str, keys: dict) -> Path:
    words = ("The quick brown fox jumps over the lazy dog. " * 200).strip()
    data = tmp / "long.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "Repeat."},
                                                     {"role": "assistant", "content": words}]}) + "\n"
                            for _ in range(BATCH * STEPS)))
    recipe = {"model_name_or_path": str(model), "dataset_mixer": {str(data): 1.0}, "output_dir": str(tmp / name),
              "per_device_train_batch_size": BATCH, "max_length": LENGTH, "max_steps": STEPS, "save_strategy": "no",
              "logging_steps": 1, "learning_rate": 1e-4, "report_to": "none", "overwrite_output_dir": True,
              "optim": "adamw_torch", **keys}
    path = tmp / f"{name}.yml"
    import yaml

    path.write_text(yaml.safe_dump(recipe))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="estimates only, no training (no GPU needed)")
    args = parser.parse_args()
    results = {"shape": SHAPE, "batch": BATCH, "max_length": LENGTH, "cases": {}}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = tmp / "model"
        build_model(model, args.dry_run)
        for name, keys in CASES.items():
            recipe = write_recipe(tmp, model, name, keys)
            est = json.loads(subprocess.run([sys.executable, "-m", "ftkit", "estimate", str(recipe), "--json"],
                                            check=True, capture_output=True, text=True, cwd=ROOT).stdout)
            case = {"estimate_gib": round(est["bytes"]["total"] / 2**30, 3),
                    "estimate_parts_gib": {k: round(v / 2**30, 3) for k, v in est["bytes"].items()}}
            if not args.dry_run:
                run = subprocess.run([sys.executable, "-m", "ftkit", "train", str(recipe), "--no-cache"],
                                     capture_output=True, text=True, cwd=ROOT)
                if run.returncode != 0:
                    case["error"] = run.stderr[-2000:]
                else:
                    summary = json.loads((tmp / name / "train_summary.json").read_text())
                    case["measured_gib"] = round(summary["peak_memory_mb"] / 1024, 3)
                    case["estimate_over_measured"] = round(case["estimate_gib"] / case["measured_gib"], 3)
            results["cases"][name] = case
            print(name, json.dumps(case))
    if not args.dry_run:
        import torch

        results["device"] = torch.cuda.get_device_name(0)
        results["torch"] = torch.__version__
        out = ROOT / "bench" / "results" / "estimate_gpu.json"
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
