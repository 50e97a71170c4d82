"""Measure one ftkit training run from inside its process: what the model saw (tokens, padding, tokens that
carry loss), per-step times, and train_summary.json's runtime and peak memory. ftkit's own code path runs
unchanged (`run_training` on the recipe); a wrapper around TRL's `SFTTrainer.training_step` counts each batch
as the model receives it, so every mode (padded, padding-free, packed) is counted the same way.

    python bench/measure.py RECIPE.yml [RECIPE.yml ...] --out results.json [--threads N]

A recipe ftkit refuses gives "refused: <its first error line>", any other failure "error: <type>: <line>";
neither stops the other recipes. Used by train_throughput.py and gpu.py, one process per run or all in one.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


class BatchCounter:
    """Totals over every batch passed to training_step; tensors are summed on their device and read once at the
    end, so counting adds no GPU synchronisation to a step."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.parts: list[tuple] = []
        self.ended: float | None = None
        self.trainer_facts: dict = {}

    def add(self, trainer, inputs: dict) -> None:
        self.starts.append(time.perf_counter())
        ids = inputs["input_ids"]
        if "attention_mask" in inputs:
            pad = (inputs["attention_mask"] == 0).sum()
        else:  # padding-free batches carry no mask: the collator pads with pad_token_id only (pad_to_multiple_of)
            pad = (ids == trainer.processing_class.pad_token_id).sum()
        loss = (inputs["labels"] != -100).sum() if "labels" in inputs else ids.new_zeros(())
        self.parts.append((ids.numel(), pad, loss, ids.shape[0]))
        if not self.trainer_facts:
            self.trainer_facts = trainer_facts(trainer)

    def totals(self) -> dict:
        seen = sum(p[0] for p in self.parts)
        pad = int(sum(int(p[1]) for p in self.parts))
        loss = int(sum(int(p[2]) for p in self.parts))
        return {"tokens_seen": seen, "pad_tokens": pad, "real_tokens": seen - pad, "loss_tokens": loss,
                "padding_fraction": round(pad / seen, 4) if seen else None, "batches": len(self.parts),
                "mean_rows_per_batch": round(sum(p[3] for p in self.parts) / max(len(self.parts), 1), 2),
                "max_tokens_in_a_batch": max((p[0] for p in self.parts), default=0)}


def trainer_facts(trainer) -> dict:
    args, model = trainer.args, trainer.model
    config = getattr(model, "config", None)
    return {"bf16": bool(args.bf16), "fp16": bool(args.fp16), "device": str(args.device),
            "attn_implementation": getattr(config, "_attn_implementation", None),
            "gradient_checkpointing": bool(getattr(model, "is_activation_checkpointing",  # transformers < 5.23:
                                                   getattr(model, "is_gradient_checkpointing", False))),
            "padding_free_collator": bool(getattr(trainer, "padding_free", False)),
            "packing": bool(args.packing), "packing_strategy": args.packing_strategy if args.packing else None}


COUNTER = BatchCounter()


def install() -> None:
    """Wrap SFTTrainer.training_step (count, time) and SFTTrainer.train (end time) once per process."""
    from trl import SFTTrainer

    if getattr(SFTTrainer.training_step, "_bench", False):
        return
    step, train = SFTTrainer.training_step, SFTTrainer.train

    def training_step(self, model, inputs, *args, **kwargs):
        COUNTER.add(self, inputs)
        return step(self, model, inputs, *args, **kwargs)

    def train_(self, *args, **kwargs):
        try:
            return train(self, *args, **kwargs)
        finally:
            COUNTER.ended = time.perf_counter()

    training_step._bench = True
    SFTTrainer.training_step, SFTTrainer.train = training_step, train_


def step_times(counter: BatchCounter) -> dict:
    """Step times and throughput over the steps after the first (which pays for lazy initialisation: kernels,
    allocator), from the first step's start to the end of training."""
    starts, ended = counter.starts, counter.ended
    if len(starts) < 2 or ended is None:
        return {"first_step_ms": None, "mean_step_ms": None, "real_tokens_per_s": None, "loss_tokens_per_s": None}
    steady = ended - starts[1]
    later = counter.parts[1:]
    real = sum(p[0] - int(p[1]) for p in later)
    loss = sum(int(p[2]) for p in later)
    return {"first_step_ms": round(1000 * (starts[1] - starts[0]), 1),
            "mean_step_ms": round(1000 * steady / (len(starts) - 1), 1),
            "real_tokens_per_s": round(real / steady, 1), "loss_tokens_per_s": round(loss / steady, 1)}


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def measure(recipe_path: Path, log=print) -> dict:
    """Train the recipe with ftkit; -> the figures, or {"status": "refused: ..."} / {"status": "error: ..."}."""
    from ftkit.config.recipe import load_recipe
    from ftkit.errors import FtkitError

    global COUNTER
    COUNTER = BatchCounter()
    try:
        recipe = load_recipe(recipe_path)
        install()
        out = _train(recipe, log)
    except FtkitError as err:
        return {"status": f"refused: {err.lines[0] if err.lines else first_line(err)}"}
    except Exception as err:  # a library's failure on this mode (e.g. out of memory) is a result, not a crash
        return {"status": f"error: {type(err).__name__}: {first_line(err)}"}
    summary = json.loads((out / "train_summary.json").read_text())
    meta = json.loads((out / "ftkit_run.json").read_text()) if (out / "ftkit_run.json").is_file() else {}
    totals = COUNTER.totals()
    return {"status": "ok", "steps": summary["global_step"], "train_runtime_s": summary["train_runtime_s"],
            **totals, **step_times(COUNTER), "ftkit_tokens_per_s": summary["tokens_per_second"],
            "peak_memory_mb": summary["peak_memory_mb"], "weights_dtype": meta.get("dtype"),
            "quantization": meta.get("quantization"), "final_train_loss": summary["final_train_loss"],
            **COUNTER.trainer_facts}


def _train(recipe, log):
    import torch

    from ftkit.train.run import run_training

    if torch.cuda.is_available():  # several runs in one process: each one's peak is its own
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return run_training(recipe, use_cache=False, log=log)


def pin_threads(threads: int | None) -> None:
    """A fixed thread count on a shared machine: OpenMP and torch's intra-op pool."""
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="JSON file: one result per recipe, in order")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: leave as set)")
    args = parser.parse_args()
    pin_threads(args.threads)
    results = [measure(recipe) for recipe in args.recipes]
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
