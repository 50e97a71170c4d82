"""What an accelerate config (or a launched worker's environment) asks for, and the recipe x engine
combinations the libraries do not support (QLoRA with FSDP or ZeRO-3, 8-bit sharding, MULTI_CPU).

Read as plain YAML rather than with accelerate's config loader: this runs in the launching process, which
must not import torch or accelerate just to check a recipe. Tests load every shipped config with
accelerate's own loader to keep the two in agreement.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from ftkit.config.precision import GPU_WITH_BF16, training_precision
from ftkit.errors import FtkitError
from ftkit.files import read_text

SHARDED_STORAGE = ("bfloat16", "float16", "float32")


@dataclass
class Plan:
    """What an accelerate config (or a launched worker's environment) asks for, as far as ftkit cares."""

    distributed_type: str = "NO"  # MULTI_GPU, FSDP, DEEPSPEED, MULTI_CPU, NO, ...
    zero_stage: int | None = None
    fsdp_version: int | None = None
    num_processes: int | None = None
    use_cpu: bool = False
    source: str = ""

    @property
    def shards_parameters(self) -> bool:
        return self.distributed_type == "FSDP" or (self.distributed_type == "DEEPSPEED" and self.zero_stage == 3)

    @property
    def engine(self) -> str:
        if self.distributed_type == "FSDP":
            return f"FSDP{self.fsdp_version or 1}"
        if self.distributed_type == "DEEPSPEED":
            return f"DeepSpeed ZeRO-{self.zero_stage}"
        return self.distributed_type


def read_config(path: Path) -> Plan:
    """The fields of an accelerate YAML config that decide what ftkit must check (plain YAML, no accelerate)."""
    if not path.is_file():
        raise FtkitError(f"--launcher: accelerate config '{path}' does not exist (see accelerate_configs/)")
    try:
        data = yaml.safe_load(read_text(path, "accelerate config")) or {}
    except yaml.YAMLError as err:
        raise FtkitError(f"--launcher: '{path}' is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict) or "distributed_type" not in data:
        raise FtkitError(f"--launcher: '{path}' is not an accelerate config (no distributed_type); "
                         "see accelerate_configs/ or run `accelerate config --config_file FILE`")
    ds, fsdp = data.get("deepspeed_config") or {}, data.get("fsdp_config") or {}
    stage = ds.get("zero_stage")
    return Plan(distributed_type=str(data["distributed_type"]).upper(),
                zero_stage=int(stage) if stage is not None else None,
                fsdp_version=int(fsdp.get("fsdp_version", 1)) if data["distributed_type"] == "FSDP" else None,
                num_processes=data.get("num_processes"), use_cpu=bool(data.get("use_cpu")), source=str(path))


def plan_from_environment() -> Plan:
    """Inside a worker that `accelerate launch` started: the same facts, from the variables it sets."""
    env = os.environ
    if env.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        return Plan("FSDP", fsdp_version=int(env.get("FSDP_VERSION", "1")), source="accelerate launch")
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        return Plan("DEEPSPEED", zero_stage=int(stage) if stage else None, source="accelerate launch")
    return Plan("MULTI_GPU" if int(env.get("WORLD_SIZE", "1")) > 1 else "NO", source="environment")


def check_plan(recipe, plan: Plan) -> list[str]:
    """Recipe x engine combinations that the libraries do not support, each with the fix."""
    m, problems = recipe.model, []
    if plan.distributed_type == "MULTI_CPU":
        problems.append(f"{plan.source}: distributed_type MULTI_CPU starts a single process under accelerate "
                        "launch; for several CPU processes use distributed_type: MULTI_GPU with use_cpu: true "
                        "(accelerate_configs/cpu.yaml)")
    if not plan.shards_parameters:
        return problems
    if plan.use_cpu:
        problems.append(f"{plan.source}: {plan.engine} cannot run on CPU; use accelerate_configs/cpu.yaml")
    if m.load_in_8bit:
        problems.append(f"load_in_8bit: 8-bit weights cannot be sharded by {plan.engine}; use load_in_4bit with "
                        "bnb_4bit_quant_storage (see accelerate_configs/README.md), or DDP / DeepSpeed ZeRO-2 "
                        "(accelerate_configs/ddp.yaml, deepspeed_zero2.yaml)")
    if m.load_in_4bit:
        storage, weights = m.bnb_4bit_quant_storage, training_precision(m, recipe.sft, GPU_WITH_BF16).dtype
        if storage not in SHARDED_STORAGE:
            problems.append(f"bnb_4bit_quant_storage: QLoRA with {plan.engine} needs the 4-bit weights stored in a "
                            f"float dtype that it can shard (got {storage or 'uint8, the default'}); set "
                            "bnb_4bit_quant_storage: bfloat16 and dtype: bfloat16 (with bf16: true)")
        elif storage != weights:
            problems.append(f"bnb_4bit_quant_storage: QLoRA with {plan.engine} needs it equal to the weights' dtype; "
                            f"got {storage} with weights in {weights}; set dtype: {storage}"
                            + (" and bf16: true" if storage == "bfloat16" else ""))
    return problems


def check_launch(recipe, plan: Plan) -> None:
    problems = check_plan(recipe, plan)
    if problems:
        raise FtkitError(*problems)
