"""What the libraries say during a run, routed through the run's display instead of straight to the terminal.

- Their log records (transformers, datasets, TRL, PEFT, accelerate, huggingface_hub, bitsandbytes, torch) and
  Python warnings go to train.log; a warning or error is also shown, once per message, unless it is known
  noise (NOISE); with --verbose every record is shown.
- transformers' progress bars ("Loading weights", "Writing model shards") become the detail of ftkit's phase
  line, through transformers' own tqdm hook; datasets' and huggingface_hub's bars are switched off through
  their own switches (an HF_*_DISABLE_PROGRESS_BARS variable the user set wins); any other tqdm bar (TRL's
  reference log-prob pass) through tqdm's TQDM_DISABLE, unless the user set it. --verbose keeps every bar.
- The trainer's tqdm bar and raw dict printing are transformers' ProgressCallback/PrinterCallback: the
  trainer replaces those with ftkit's DisplayCallback (train/callbacks.py), not here.

Everything changed is put back when the run ends, so a process that trains twice (tests, notebooks) is
left as it was.
"""

from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager

LIBRARIES = ("transformers", "datasets", "trl", "peft", "accelerate", "huggingface_hub", "bitsandbytes", "torch",
             "py.warnings")
# Libraries whose warnings are recorded but not shown: bitsandbytes warns at import about optional CPU/GPU
# kernels whether or not the run quantises anything.
RECORD_ONLY = {"bitsandbytes"}
# Library warnings that are recorded but not shown: nothing in them for the user to act on in an ftkit run.
NOISE = re.compile("|".join([
    r"use_cache=True. is incompatible with gradient checkpointing",
    r"Setting `pad_token_id` to `eos_token_id`",
    r"The attention mask and the pad token id were not set",
    r"Could not find a config file in .* - will assume that the vocabulary was not modified",
    r"torch\.utils\.checkpoint: the use_reentrant parameter",
    r"FutureWarning|DeprecationWarning",
    r"Cannot (dis|en)able progress bars",
]))


class LibraryHandler(logging.Handler):
    """Library log records -> display: warnings shown once, everything recorded."""

    def __init__(self, display):
        super().__init__(level=logging.DEBUG)
        self.display = display

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage().strip()
        except Exception:  # a library's malformed log call must not end the run
            return
        library = record.name.split(".")[0]
        if library == "py" and record.name == "py.warnings":
            message, library = warning_text(message), "python"
        if not message:
            return
        first = message.splitlines()[0]
        if record.levelno >= logging.WARNING and library not in RECORD_ONLY and not NOISE.search(message):
            self.display.warn_once(f"{library}: {first}", full=f"{library}: {message}")
        else:
            self.display.library(f"{library} {record.levelname.lower()}: {message}")


def warning_text(formatted: str) -> str:
    """`path:line: UserWarning: text\\n  source` (how logging.captureWarnings words it) -> `UserWarning: text`."""
    first = formatted.splitlines()[0] if formatted else ""
    match = re.match(r"^.*?:\d+: (\w+: .*)$", first)
    return match.group(1) if match else first


class PhaseBar:
    """A tqdm stand-in for transformers' bars: counts into the display's phase detail ("Loading weights 12/21")."""

    def __init__(self, display, iterable=None, desc: str | None = None, total: int | None = None, **_ignored):
        self.display, self.iterable, self.desc = display, iterable, desc or ""
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self.disable = total, 0, False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return self.total or 0

    def update(self, n: int = 1) -> None:
        self.n += n
        of = f"/{self.total}" if self.total else ""
        self.display.set_detail(f"{self.desc} {self.n}{of}".strip())

    def close(self) -> None:
        self.display.set_detail("")

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def refresh(self, *args, **kwargs) -> None:
        pass

    def write(self, text: str, *args, **kwargs) -> None:
        self.display.library(str(text))


@contextmanager
def library_output(display):
    """Route the libraries' logging, warnings and progress bars through `display` for the duration."""
    import datasets
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as hf_logging

    verbose = display.level == "verbose"
    loggers = {name: logging.getLogger(name) for name in LIBRARIES}
    saved = {name: (lg.handlers[:], lg.propagate, lg.level) for name, lg in loggers.items()}
    handler = LibraryHandler(display)
    for lg in loggers.values():
        lg.handlers = [handler]
        lg.propagate = False
        lg.setLevel(logging.INFO)  # info records reach train.log; shown only with --verbose
    capturing = logging._warnings_showwarning is not None  # noqa: SLF001 - captureWarnings keeps no other state
    logging.captureWarnings(True)
    previous_hook = None if verbose else hf_logging.set_tqdm_hook(lambda _factory, args, kwargs: PhaseBar(
        display, *args, **kwargs))
    bars = switch_bars(datasets, hub_utils, off=not verbose)
    tqdm_off = not verbose and "TQDM_DISABLE" not in os.environ
    if tqdm_off:
        os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if tqdm_off:
            os.environ.pop("TQDM_DISABLE", None)
        if not verbose:
            hf_logging.set_tqdm_hook(previous_hook)
        switch_bars(datasets, hub_utils, off=False, only=bars)
        logging.captureWarnings(capturing)
        for name, lg in loggers.items():
            lg.handlers, lg.propagate, level = saved[name]
            lg.setLevel(level)


def switch_bars(datasets, hub_utils, off: bool, only: list[str] | None = None) -> list[str]:
    """Turn datasets' and huggingface_hub's bars off (or back on); -> those it changed. A variable the user set
    (HF_DATASETS_DISABLE_PROGRESS_BARS, HF_HUB_DISABLE_PROGRESS_BARS) is left to decide."""
    changed = []
    for name, env, enabled, disable, enable in (
            ("datasets", "HF_DATASETS_DISABLE_PROGRESS_BARS", datasets.is_progress_bar_enabled,
             datasets.disable_progress_bars, datasets.enable_progress_bars),
            ("hub", "HF_HUB_DISABLE_PROGRESS_BARS", lambda: not hub_utils.are_progress_bars_disabled(),
             hub_utils.disable_progress_bars, hub_utils.enable_progress_bars)):
        if only is not None:
            if name in only:
                enable()
            continue
        if off and env not in os.environ and enabled():
            disable()
            changed.append(name)
    return changed
