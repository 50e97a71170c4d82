"""The `vllm serve` command that serves a run or a merged model in production: `ftkit serve` prints it at start-up
and the run's model card shows it, from this one rule."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from ftkit import rundir

VLLM_MAX_LORA_RANK = 16  # vLLM's default --max-lora-rank


def production_line(adapter: Path | None, model_dir: Path | None, base: str | None, name: str) -> tuple[str, str]:
    """The vLLM command that serves the same model under the same id, and what would stop it working ("")."""
    if adapter is None:
        return f"vllm serve {shlex.quote(str(Path(model_dir).resolve()))} --served-model-name {shlex.quote(name)}", ""
    config = json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8"))
    base_given, base = base is not None, base or config["base_model_name_or_path"]
    rank = max([config.get("r") or 0, *(config.get("rank_pattern") or {}).values()])
    line = (f"vllm serve {shlex.quote(base)} --enable-lora --lora-modules "
            f"{shlex.quote(f'{name}={Path(adapter).resolve()}')}")
    line += f" --max-lora-rank {rank}" if rank > VLLM_MAX_LORA_RANK else ""
    saved = config.get("modules_to_save") or []
    merge = f"run `ftkit merge --adapter {shlex.quote(str(adapter))} --output MERGED` and `vllm serve MERGED` instead"
    note = f"vLLM's LoRA loader refuses adapters with modules_to_save ({', '.join(saved)}): {merge}" if saved else ""
    if not base_given and rundir.run_metadata(Path(adapter)).get("base_adapters"):  # a preference run on an SFT one
        note = (f"this adapter was trained on {base} with an earlier run's adapter merged in, which vLLM would not "
                f"add: {merge}")
    return line, note
