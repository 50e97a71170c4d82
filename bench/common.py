"""What the bench scripts share: the tiny model, synthetic chats whose token counts are known, recipes, and
the machine description every result file carries. Light imports only (no torch at import time)."""

from __future__ import annotations

import json
import math
import platform
import random
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# Chat lengths in tokens: lognormal (median 250, sigma 1.0: mean ~410, 1 in 10 above ~900), clipped like the brief says.
MEDIAN_TOKENS, SIGMA, MIN_TOKENS, MAX_TOKENS = 250, 1.0, 20, 2000


def build_tiny_model(out: Path, max_positions: int = 2048) -> Path:
    """scripts/make_tiny_model.py's model, with room for chats up to `max_positions` tokens."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_tiny_model import build

    build(out)
    for name, key in (("config.json", "max_position_embeddings"), ("tokenizer_config.json", "model_max_length")):
        data = json.loads((out / name).read_text())
        data[key] = max(data.get(key) or 0, max_positions)
        (out / name).write_text(json.dumps(data, indent=2))
    return out


def single_token_words(tokenizer, limit: int = 4000) -> list[str]:
    """Vocabulary entries ' word' that encode to exactly one token: text made of them has a known length."""
    words = []
    for idx in sorted(tokenizer.get_vocab().values()):
        text = tokenizer.decode([idx])
        if len(text) > 2 and text[0] == " " and text[1:].isascii() and text[1:].isalpha():
            if tokenizer.encode(text, add_special_tokens=False) == [idx]:
                words.append(text)
                if len(words) >= limit:
                    break
    if len(words) < 20:
        raise SystemExit("bench: the tokenizer has fewer than 20 single-token ' word' entries; "
                         "cannot make synthetic chats")
    return words


def chat_length(tokenizer, messages: list[dict]) -> int:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    return len(ids)


def synthetic_chats(tokenizer, rows: int, seed: int = 0, max_tokens: int = MAX_TOKENS) -> tuple[list[dict], list[int]]:
    """`rows` user/assistant chats whose rendered lengths follow the lognormal above; -> (rows, token lengths).
    Every word is one token, so a chat's length is the template's overhead plus its words."""
    rng = random.Random(seed)
    words = single_token_words(tokenizer)
    empty = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]
    overhead = chat_length(tokenizer, empty)
    chats, targets = [], []
    for _ in range(rows):
        target = round(rng.lognormvariate(math.log(MEDIAN_TOKENS), SIGMA))
        target = min(max_tokens, max(MIN_TOKENS, overhead + 2, target))
        user = min(rng.randint(4, 24), (target - overhead) // 2)
        texts = ["".join(rng.choice(words) for _ in range(n)) for n in (user, target - overhead - user)]
        chats.append({"messages": [{"role": "user", "content": texts[0]}, {"role": "assistant", "content": texts[1]}]})
        targets.append(target)
    return chats, targets


def length_stats(lengths: list[int]) -> dict:
    ordered = sorted(lengths)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"rows": len(ordered), "mean": round(sum(ordered) / len(ordered), 1), "median": pick(0.5),
            "p90": pick(0.9), "min": ordered[0], "max": ordered[-1], "total": sum(ordered)}


def write_data(path: Path, tokenizer, rows: int, seed: int = 0, max_tokens: int = MAX_TOKENS) -> dict:
    """The synthetic chats as JSONL; -> their length statistics, measured by the tokenizer itself."""
    chats, targets = synthetic_chats(tokenizer, rows, seed, max_tokens)
    path.write_text("".join(json.dumps(c) + "\n" for c in chats))
    lengths = [chat_length(tokenizer, c["messages"]) for c in chats]
    return {**length_stats(lengths), "lengths_as_generated": lengths == targets}


def write_recipe(path: Path, **keys) -> Path:
    path.write_text(yaml.safe_dump(keys, sort_keys=False))
    return path


def lora_recipe(model: Path, data: Path, out: Path, **keys) -> dict:
    """A plain LoRA recipe on the synthetic data; the bench's cases override what they vary."""
    return {"model_name_or_path": str(model), "use_peft": True, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
            "lora_target_modules": "all-linear", "dataset_mixer": {str(data): 1.0}, "output_dir": str(out),
            "per_device_train_batch_size": 8, "max_length": 2048, "max_steps": 10, "learning_rate": 1e-4,
            "lr_scheduler_type": "constant", "gradient_checkpointing": False, "logging_steps": 1,
            "save_strategy": "no", "report_to": "none", "seed": 0, "overwrite_output_dir": True, **keys}


def load_average() -> list[float] | None:
    """1, 5 and 15-minute load: on a shared machine, how busy the others kept it."""
    try:
        with open("/proc/loadavg") as handle:
            return [float(x) for x in handle.read().split()[:3]]
    except OSError:
        return None


def machine() -> dict:
    """CPU model, cores, load (at the start) and library versions: what a figure needs to be compared."""
    info = {"cpu": platform.processor() or platform.machine(), "cores": None, "load_average": load_average()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = re.search(r"^Model name:\s*(.+)$", lscpu, re.M)
        cores = re.search(r"^CPU\(s\):\s*(\d+)$", lscpu, re.M)
        info.update(cpu=model.group(1).strip() if model else info["cpu"], cores=int(cores.group(1)) if cores else None)
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    for package in ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "flash_attn"):
        try:
            info[package] = version(package.replace("_", "-"))
        except PackageNotFoundError:
            info[package] = None
    info["python"] = platform.python_version()
    return info


def write_result(path: Path, result: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
