"""Where a LoRA bf16 step's time goes on a GPU, beside plain TRL and full fine-tuning on the same model and data.

The first H200 run (bench/RESULTS.md) measured ftkit's LoRA bf16 step at 470-690 ms against 220 ms for full
fine-tuning and 320 ms for QLoRA on the same 1.1B model and batches; this script answers why in one call. Each
variant runs in its own process, is profiled with torch.profiler over steps 3..3+N, and writes the profiler's top
operators (by CUDA and by CPU self time) and its step times to OUT/<variant>.txt, with a summary in OUT/summary.json.

    python bench/gpu_profile.py --out-dir /tmp/prof            # CUDA: the 1.1B Llama of bench/gpu.sh
    python bench/gpu_profile.py --dry-run --out-dir /tmp/prof  # CPU, tiny model: checks the script

Variants: ftkit LoRA bf16 (PEFT's default fp32 adapters), plain TRL SFTTrainer with the same LoRA config (TRL wraps
the model itself), and ftkit full fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

VARIANTS = ("ftkit_lora", "trl_lora", "ftkit_full")
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}


def profiler_callback(first: int, steps: int, out: Path):
    """A TrainerCallback: step times for every step, torch.profiler over steps first..first+steps."""
    import torch
    from transformers import TrainerCallback

    class Profile(TrainerCallback):
        def __init__(self):
            self.starts: list[float] = []
            self.profiler = None

        def on_step_begin(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.starts.append(time.perf_counter())
            if state.global_step == first:
                activities = [torch.profiler.ProfilerActivity.CPU]
                if torch.cuda.is_available():
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                self.profiler = torch.profiler.profile(activities=activities)
                self.profiler.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if self.profiler is not None and state.global_step == first + steps:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.profiler.__exit__(None, None, None)
                self.write()
                self.profiler = None

        def write(self) -> None:
            table = self.profiler.key_averages()
            cuda = torch.cuda.is_available()
            text = [f"steps {first}..{first + steps}, step start times (s): "
                    f"{[round(b - a, 4) for a, b in zip(self.starts, self.starts[1:])]}"]
            if cuda:
                text.append(table.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=60))
            text.append(table.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))
            out.write_text("\n\n".join(text) + "\n")

    return Profile()


def run_ftkit(model: Path, data: Path, work: Path, variant: str, args: argparse.Namespace, callback) -> None:
    from ftkit.config.recipe import load_recipe
    from ftkit.train import run as train_run

    keys = {"per_device_train_batch_size": args.batch, "max_length": args.max_length, "max_steps": args.steps,
            "logging_steps": args.steps}
    if variant == "ftkit_full":
        keys.update(use_peft=False, learning_rate=1e-5)
    recipe = common.lora_recipe(model, data, work / variant, **keys)
    if not recipe["use_peft"]:
        recipe = {k: v for k, v in recipe.items() if not k.startswith("lora_")}
    build = train_run.build_trainer

    def with_profiler(*a, **k):  # ftkit's own trainer, with the profiler callback added
        trainer, guard, interrupt = build(*a, **k)
        trainer.add_callback(callback)
        return trainer, guard, interrupt

    train_run.build_trainer = with_profiler
    train_run.run_training(load_recipe(common.write_recipe(work / f"{variant}.yml", **recipe)), use_cache=False,
                           log=lambda *_: None)


def run_trl(model: Path, data: Path, work: Path, args: argparse.Namespace, callback) -> None:
    """The script a user writes: TRL's SFTTrainer given the peft_config, bf16 on a GPU."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    config = SFTConfig(output_dir=str(work / "trl_lora"), per_device_train_batch_size=args.batch,
                       max_length=args.max_length, max_steps=args.steps, learning_rate=1e-4,
                       lr_scheduler_type="constant", logging_steps=args.steps, save_strategy="no", report_to="none",
                       seed=0, bf16=cuda, use_cpu=not cuda, gradient_checkpointing=False, assistant_only_loss=False)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16 if cuda else None),
                         args=config, train_dataset=load_dataset("json", data_files=str(data), split="train"),
                         processing_class=AutoTokenizer.from_pretrained(model),
                         peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA), callbacks=[callback])
    trainer.train()


def child(variant: str, model: Path, data: Path, work: Path, out_dir: Path, args: argparse.Namespace) -> None:
    work.mkdir(parents=True, exist_ok=True)
    callback = profiler_callback(first=3, steps=args.profile_steps, out=out_dir / f"{variant}.txt")
    if variant == "trl_lora":
        run_trl(model, data, work, args, callback)
    else:
        run_ftkit(model, data, work, variant, args, callback)
    durations = [b - a for a, b in zip(callback.starts, callback.starts[1:])]  # duration of step i (0-based)
    profiled = range(3, 3 + args.profile_steps + 1)
    steady = [round(d, 4) for i, d in enumerate(durations) if i >= 1 and i not in profiled]  # no warm-up, no profiler
    (out_dir / f"{variant}.json").write_text(json.dumps({"step_s": steady,
                                                         "median_step_s": sorted(steady)[len(steady) // 2]
                                                         if steady else None}) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, a few steps: checks the script")
    parser.add_argument("--steps", type=int, default=None, help="steps per variant (default 14; dry run 9)")
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=None, help="default 2048; dry run 256")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--child", nargs=4, metavar=("VARIANT", "MODEL", "DATA", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps = args.steps or (9 if args.dry_run else 14)
    args.max_length = args.max_length or (256 if args.dry_run else 2048)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.child:
        variant, model, data, work = args.child
        child(variant, Path(model), Path(data), Path(work), args.out_dir, args)
        return {}
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from gpu import build_model
    from transformers import AutoTokenizer

    summary: dict = {}
    with tempfile.TemporaryDirectory(prefix="ftkit-gpu-profile-") as tmp_name:
        tmp = Path(tmp_name)
        model = build_model(tmp, args.dry_run)
        data = tmp / "chats.jsonl"
        common.write_data(data, AutoTokenizer.from_pretrained(model), 64, max_tokens=min(2000, args.max_length))
        passed = [a for a in (argv if argv is not None else sys.argv[1:])]
        for variant in args.variants.split(","):
            run = subprocess.run([sys.executable, __file__, *passed, "--child", variant, str(model), str(data),
                                  str(tmp / "work")], capture_output=True, text=True)
            result = args.out_dir / f"{variant}.json"
            summary[variant] = (json.loads(result.read_text()) if run.returncode == 0 and result.is_file()
                                else {"error": (run.stderr.strip().splitlines() or ["no output"])[-1]})
            print(f"{variant}: {summary[variant]}", flush=True)
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
