"""Which process this is, without torch: rank 0 alone prints notes, summaries and errors."""

from __future__ import annotations

import os

LAUNCHED_ENV = "FTKIT_LAUNCHED"  # set for the workers: the launcher already printed the recipe's notes


def is_main_process() -> bool:
    """Rank 0 of a launched run, or a plain single process."""
    return os.environ.get("RANK", "0") == "0"


def log_for_rank(log=print):
    """`log` on the main process, a no-op on the others (every rank meets the same notes)."""
    return log if is_main_process() else (lambda *_args, **_kwargs: None)
