"""What a training step costs in the LM head: the model's own loss over materialised logits (what transformers'
Trainer, and axolotl's trainer built on it, run) against TRL's fused LM head (what SFTTrainer, and so a
hand-written TRL script, run: log-probs in chunks without the full logits, the projection recomputed in backward,
plus the entropy and top-1 flags behind its `entropy`/`mean_token_accuracy` metrics) and against ftkit's
materialised head on a CPU (src/ftkit/train/lm_head.py: TRL's outputs from the full logits).

    python bench/lm_head.py [--reps 5]          # writes bench/results/lm_head.json

Forward + backward of one batch (4 x 256 tokens, the first 64 of each row masked) on random-init Llama configs,
one thread, fp32; each variant timed in turn, order rotated per repetition, medians of the steps after warm-up.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from trl.trainer.utils import add_fused_lm_head

from ftkit.train.lm_head import materialised_forward

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SIZES = {  # name: (hidden, layers, heads, vocab)
    "tiny (the vs_trl.py model's shape)": (64, 2, 4, 1024),
    "small, 32k vocabulary": (256, 2, 4, 32000),
}
SFT_OUTPUTS = ("log_probs", "entropy", "is_top1")
VARIANTS = {
    "model's own loss (materialised logits)": None,
    "TRL fused head, log-probs only": ("log_probs",),
    "TRL fused head as SFTTrainer runs it (+ entropy, top-1)": SFT_OUTPUTS,
    "ftkit on a CPU (train/lm_head.py: the same outputs from the logits)": "ftkit",
}


def build(hidden: int, layers: int, heads: int, vocab: int) -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def step_ms(model, outputs, ids, labels, steps: int) -> float:
    """Median ms of forward + backward after two warm-up steps."""
    times = []
    for _ in range(steps + 2):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        if outputs is None:
            loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        else:
            out = model(input_ids=ids, labels=labels, use_cache=False, fused_lm_head=True)
            loss = out.loss
            if outputs != ("log_probs",):  # SFTTrainer's metrics, with their host syncs
                count = out.label_mask.sum()
                (out.entropy.detach().sum() / count).item(), (out.is_top1.sum() / count).item()
        loss.backward()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times[2:])


def measure(size: tuple, reps: int, steps: int) -> dict:
    base = build(*size)
    ids = torch.randint(0, size[3], (4, 256))
    labels = ids.clone()
    labels[:, :64] = -100
    models = {}
    for name, outputs in VARIANTS.items():
        models[name] = copy.deepcopy(base)
        if outputs is not None:
            add_fused_lm_head(models[name], outputs=SFT_OUTPUTS if outputs == "ftkit" else outputs)
        if outputs == "ftkit":
            fused = models[name].forward
            models[name].forward = types.MethodType(materialised_forward(fused, size[3]), models[name])
    runs = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            runs[name].append(step_ms(models[name], VARIANTS[name], ids, labels, steps))
    return {name: round(statistics.median(values), 2) for name, values in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "lm_head.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {"what": __doc__.splitlines()[0], "machine": common.machine(), "ms_per_step": {}}
    for label, size in SIZES.items():
        result["ms_per_step"][label] = measure(size, args.reps, args.steps)
        print(label, json.dumps(result["ms_per_step"][label]), flush=True)
    result["machine"]["load_average_end"] = common.load_average()
    print(f"wrote {common.write_result(args.out, result)}")


if __name__ == "__main__":
    main()
