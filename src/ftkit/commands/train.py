"""`ftkit train`: read the recipe once, then train in this process, or hand the run to `accelerate launch`."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

from ftkit.errors import FtkitError


def run_train(recipe: Path, sets: list[str], resume: bool, no_cache: bool, launcher: Path | None,
              num_processes: int | None, machine_rank: int | None, level: str, debug: bool,
              show_notes: Callable[[list[str]], None], echo: Callable[[str], None]) -> None:
    """`level`: quiet, normal or verbose. Notes are shown once: by the launcher, or by rank 0 here."""
    from ftkit.config.recipe import load_recipe
    from ftkit.dist import LAUNCHED_ENV, is_main_process

    if launcher is None and (num_processes is not None or machine_rank is not None):
        raise FtkitError("--num-processes and --machine-rank need --launcher CONFIG (e.g. accelerate_configs/ddp.yaml)")
    sets = [*sets, *(["resume_from_checkpoint=true"] if resume else [])]
    parsed = load_recipe(recipe, sets)
    quiet = level == "quiet"
    if launcher is not None:
        from ftkit.commands import launch

        if not quiet:
            show_notes(parsed.notes)
        code = launch.launch(parsed, recipe, launcher, sets, no_cache, num_processes, machine_rank, debug=debug,
                             echo=echo, display_flags=[f"--{level}"] if level != "normal" else [])
        sys.exit(code)  # accelerate's exit status, as is
    from ftkit.train.display import RunDisplay
    from ftkit.train.run import run_training

    display = RunDisplay(level)
    for note in parsed.notes:
        display.record(f"note: {note}")
    if is_main_process() and not os.environ.get(LAUNCHED_ENV) and not quiet:  # the launcher printed them
        show_notes(parsed.notes)
    run_training(parsed, use_cache=not no_cache, recipe_path=recipe, display=display)
