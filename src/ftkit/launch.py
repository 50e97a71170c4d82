"""`ftkit train --launcher CONFIG`: check once, then re-run ftkit under `accelerate launch`.

The launching process validates the recipe, the output_dir and the recipe/config combination (QLoRA with
FSDP or ZeRO-3, 8-bit sharding), so a bad recipe prints one error and starts no worker. It then runs

    accelerate launch --config_file CONFIG [--num_processes N] [--machine_rank R] -m ftkit train RECIPE ...

passing --set/--no-cache through, forwarding SIGINT/SIGTERM to the whole launched process group, and
exiting with accelerate's exit status. Nothing here imports torch or accelerate.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from ftkit.errors import FtkitError

LAUNCHED_ENV = "FTKIT_LAUNCHED"  # set for the workers: the launcher already printed the recipe's notes
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
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
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


def expected_weights_dtype(recipe) -> str:
    """The dtype ftkit loads the weights in on a GPU (model.resolve_precision without torch)."""
    m, s = recipe.model, recipe.sft
    if m.dtype and m.dtype != "auto":
        return m.dtype
    if s.get("fp16"):
        return "float16"
    return "float32" if s.get("bf16") is False else "bfloat16"  # bf16 unset: bf16 on GPUs that have it


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
        storage, weights = m.bnb_4bit_quant_storage, expected_weights_dtype(recipe)
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


def launch_argv(config: Path, recipe_path: Path, sets: list[str], no_cache: bool, num_processes: int | None = None,
                machine_rank: int | None = None, debug: bool = False) -> list[str]:
    """The command a user could type; `exec_argv` turns it into one that uses this Python's accelerate."""
    argv = ["accelerate", "launch", "--config_file", str(config)]
    if num_processes is not None:
        argv += ["--num_processes", str(num_processes)]
    if machine_rank is not None:
        argv += ["--machine_rank", str(machine_rank)]
    argv += ["-m", "ftkit", *(["--debug"] if debug else []), "train", str(recipe_path)]
    for item in sets:
        argv += ["--set", item]
    if no_cache:
        argv.append("--no-cache")
    return argv


def exec_argv(argv: list[str]) -> list[str]:
    """`accelerate ...` -> this interpreter's accelerate CLI, so the workers run in the same environment."""
    assert argv[0] == "accelerate"
    return [sys.executable, "-m", "accelerate.commands.accelerate_cli", *argv[1:]]


def run(argv: list[str], env: dict | None = None) -> int:
    """Run the launched command in its own process group; SIGINT/SIGTERM sent to us go to that whole group
    (accelerate, torchrun and the workers), as a terminal's Ctrl-C would. -> its exit status (128+N for a
    child killed by signal N)."""
    child = subprocess.Popen(argv, env=env, start_new_session=True)

    def forward(signum, _frame):
        try:
            os.killpg(child.pid, signum)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                code = child.wait()
                break
            except KeyboardInterrupt:  # a handler installed before ours; keep waiting for the child
                forward(signal.SIGINT, None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - code if code < 0 else code


def launch(recipe, recipe_path: Path, config: Path, sets: list[str], no_cache: bool, num_processes: int | None,
           machine_rank: int | None, debug: bool, echo=print) -> int:
    """Check everything that can be checked without workers, then start them. -> exit status."""
    from ftkit.train import guard_output_dir

    if num_processes is not None and num_processes < 1:
        raise FtkitError(f"--num-processes must be at least 1, got {num_processes}")
    plan = read_config(config)
    check_launch(recipe, plan)
    guard_output_dir(recipe)
    argv = launch_argv(config, recipe_path, sets, no_cache, num_processes, machine_rank, debug)
    echo(f"launching: {' '.join(argv)}")
    return run(exec_argv(argv), env={**os.environ, LAUNCHED_ENV: "1"})


def is_main_process() -> bool:
    """Rank 0 of a launched run, or a plain single process (no torch needed)."""
    return os.environ.get("RANK", "0") == "0"
