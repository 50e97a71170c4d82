"""Time the offline demo end to end (process start to saved run) and record the figures.

    python bench/train_tiny.py            # writes bench/results/train_tiny.json
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "tiny"
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_model.py"), str(model)], check=True,
                       capture_output=True)
        out = Path(tmp) / "run"
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ftkit", "train", str(ROOT / "recipes" / "tiny-demo.yml"),
                        "--set", f"model_name_or_path={model}", "--set", f"output_dir={out}", "--no-cache"],
                       check=True, capture_output=True, cwd=ROOT)
        wall = time.perf_counter() - started
        summary = json.loads((out / "train_summary.json").read_text())
    import torch

    result = {
        "what": "ftkit train recipes/tiny-demo.yml (160 steps, LoRA r8, tiny Llama), whole process",
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "process_wall_s": round(wall, 2),
        "train_runtime_s": summary["train_runtime_s"],
        "tokens_per_second": summary["tokens_per_second"],
        "peak_memory_mb": summary["peak_memory_mb"],
    }
    path = ROOT / "bench" / "results" / "train_tiny.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
