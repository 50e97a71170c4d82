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
from pathlib import Path

from ftkit import rundir
from ftkit.config.launch_plan import check_launch, read_config
from ftkit.dist import LAUNCHED_ENV
from ftkit.errors import FtkitError



def launch_argv(config: Path, recipe_path: Path, sets: list[str], no_cache: bool, num_processes: int | None = None,
                machine_rank: int | None = None, debug: bool = False, display_flags: list[str] = ()) -> list[str]:
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
    return argv + list(display_flags)  # --quiet / --verbose


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
           machine_rank: int | None, debug: bool, echo=print, display_flags: list[str] = ()) -> int:
    """Check everything that can be checked without workers, then start them. -> exit status."""
    if num_processes is not None and num_processes < 1:
        raise FtkitError(f"--num-processes must be at least 1, got {num_processes}")
    plan = read_config(config)
    check_launch(recipe, plan)
    rundir.plan_training_dir(recipe.output_dir(), recipe.run.overwrite_output_dir,
                             recipe.sft.get("resume_from_checkpoint"))
    argv = launch_argv(config, recipe_path, sets, no_cache, num_processes, machine_rank, debug, display_flags)
    echo(f"launching: {' '.join(argv)}")
    return run(exec_argv(argv), env={**os.environ, LAUNCHED_ENV: "1"})
