"""Run directories: who wrote a directory, whether it is finished, and how ftkit writes into it safely.

Every directory ftkit writes (a training run, a merged model) gets an ownership marker first
(`ftkit_owner.json`) and its completion marker last (`ftkit_run.json`, the run's metadata). Both are
written to a temporary name and renamed, so a kill leaves either the old file or the new one. From the
markers alone a directory is:

    missing / empty   nothing there: ftkit may write
    finished          ftkit_run.json is present and readable
    unfinished        ftkit's owner marker without a readable ftkit_run.json
    foreign           files ftkit did not write (another trainer's checkpoint-N included): never overwritten unless
                      the user says so
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

from ftkit import __version__
from ftkit.errors import FtkitError

OWNER = "ftkit_owner.json"
DONE = "ftkit_run.json"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# What a training run writes; `overwrite_output_dir` removes exactly these and leaves anything else.
RUN_ARTIFACTS = ("adapter_config.json", "adapter_model.safetensors", "model.safetensors", "model-*.safetensors",
                 "model.safetensors.index.json", "config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "tokenizer.model",
                 "added_tokens.json", "vocab.json", "merges.txt", "training_args.bin", "ftkit_*.json",
                 "ftkit_recipe.yml", "train_summary.json", "loss_curve.svg", "loss_curve.png", "samples.md", "train.log", "runs",
                 "wandb", "checkpoint-*", "tmp-checkpoint-*", ".ftkit-tmp-*", "ftkit_model_card.md", "base_adapters")
# The first line of the model card ftkit writes as README.md: a README.md without it is the user's, never replaced.
CARD_MARK = "<!-- ftkit model card: written by ftkit train, replaced when this run is trained again -->"
CARD_ASIDE = "ftkit_model_card.md"  # where the card goes when the user's own README.md is there
PEFT_BLANK_CARD = "<!-- Provide a quick summary of what the model is/does. -->"  # huggingface_hub's empty template


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write to a temporary name beside `path`, flush to disk, rename: readers see the old file or the new."""
    path = Path(path)
    tmp = path.with_name(f".ftkit-tmp-{os.getpid()}-{path.name}")
    with open(tmp, "wb") as handle:
        handle.write(data.encode("utf-8") if isinstance(data, str) else data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, payload: dict) -> None:
    write_atomic(path, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def read_marker(folder: Path, name: str) -> dict | None:
    """A marker's JSON, or None when it is missing, empty, torn or not an object."""
    try:
        data = json.loads((folder / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def checkpoints(folder: Path) -> list[Path]:
    """checkpoint-N directories, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint whose trainer state was written (transformers writes that file last)."""
    complete = [p for p in checkpoints(folder) if (p / "trainer_state.json").is_file()]
    return complete[-1] if complete else None


def state(folder: Path) -> str:
    """missing, empty, finished, unfinished or foreign (see the module docstring)."""
    folder = Path(folder)
    if not folder.exists():
        return "missing"
    if not folder.is_dir():
        return "file"
    if read_marker(folder, DONE) is not None:
        return "finished"
    if (folder / OWNER).is_file():
        return "unfinished"
    return "empty" if not any(folder.iterdir()) else "foreign"


def claim(folder: Path, kind: str) -> None:
    """Create the directory if needed and write the ownership marker before anything else; it lists what was
    there already (`kept`), which clear_run never removes."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / OWNER, {"written_by": "ftkit", "kind": kind, "ftkit_version": __version__,
                                       "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                       "kept": sorted(p.name for p in folder.iterdir())})


def finish(folder: Path, metadata: dict) -> None:
    """The completion marker: written last, so a killed save leaves the directory 'unfinished'. Before it, the
    ownership marker records what the run wrote (`written`): files added later are not clear_run's to remove."""
    owner = read_marker(folder, OWNER)
    if owner is not None:
        kept = set(names(owner.get("kept")) or ())
        written = sorted({p.name for p in folder.iterdir()} - kept | {DONE})
        write_json_atomic(folder / OWNER, {**owner, "written": written})
    write_json_atomic(folder / DONE, metadata)


def names(listed) -> list[str] | None:
    """A marker's list of entry names; None when it has none (a marker from before ftkit recorded them)."""
    return [n for n in listed if isinstance(n, str)] if isinstance(listed, list) else None


def is_ftkit_card(path: Path, blank_template: bool = False) -> bool:
    """A README.md ftkit wrote: its YAML header is followed by CARD_MARK. With `blank_template`, also the blank
    template PEFT saved into runs of ftkit versions before the model card (only asked about ftkit's own runs)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            head = handle.read(4096)
    except OSError:
        return False
    return CARD_MARK in head or (blank_template and PEFT_BLANK_CARD in head)


def clear_run(folder: Path) -> list[str]:
    """Remove what an earlier ftkit run wrote (RUN_ARTIFACTS, and its model card), leaving every other file: what
    the ownership marker says was there before the run, or was not written by it. -> names removed."""
    removed, owner = [], read_marker(folder, OWNER) or {}
    kept, written = set(names(owner.get("kept")) or ()), names(owner.get("written"))
    if is_ftkit_card(folder / "README.md", blank_template=True):  # clear_run is only called on ftkit's own runs
        (folder / "README.md").unlink()
        removed.append("README.md")
    for pattern in RUN_ARTIFACTS + (OWNER,):
        for path in sorted(folder.glob(pattern)):
            if path.name in kept or (written is not None and path.name not in written):
                continue  # there before the run claimed the folder, or added after it finished: not ftkit's
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path.name)
    return removed


def check_writable(folder: Path, what: str) -> None:
    """A directory that is a file, or that cannot be created or written, is reported before any work."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FtkitError(f"{what} '{folder}' is a file, not a directory; choose another {what}")
    parent = folder
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise FtkitError(f"{what} '{folder}' cannot be written ({parent} is not writable); choose another {what}")


def run_metadata(directory: Path) -> dict:
    """ftkit_run.json of a run dir, or of the run a checkpoint-N dir belongs to; {} for a plain model dir."""
    path = run_file(directory, DONE)
    if path is None:
        return {}
    data = read_marker(path.parent, DONE)
    if data is None:
        raise FtkitError(f"{path}: unreadable (the run was interrupted while saving); resume it with "
                         "`ftkit train RECIPE --resume`, or use one of its checkpoint-N directories")
    return data


def run_file(directory: Path, name: str) -> Path | None:
    """A file of the run: in the dir itself, or in the run dir a checkpoint-N dir belongs to."""
    for folder in (directory, directory.parent):
        if (folder / name).is_file():
            return folder / name
    return None


def unfinished_problem(directory: Path) -> str | None:
    """Why a run that was killed while training or saving cannot be used, and what to do; None if it can."""
    directory = Path(directory)
    if CHECKPOINT.match(directory.name) or state(directory) != "unfinished":
        return None  # a checkpoint is complete on its own (transformers renames it into place)
    newest = latest_checkpoint(directory)
    hint = f", or use its newest checkpoint: {newest}" if newest else ""
    return f"this run did not finish (no {DONE}); resume it with `ftkit train RECIPE --resume`{hint}"


def require_finished(directory: Path) -> None:
    """chat/predict/merge/serve on a run that was killed while training or saving: one line, what to do."""
    problem = unfinished_problem(directory)
    if problem:
        raise FtkitError(f"{directory}: {problem}")


def plan_training_dir(folder: Path, overwrite: bool, resume) -> str:
    """What training may do with output_dir: 'fresh', 'overwrite' or 'resume'; anything else is refused
    with what to do. `resume` is resume_from_checkpoint (true, or a checkpoint path)."""
    folder = Path(folder)
    check_writable(folder, "output_dir")
    found = state(folder)
    if resume and overwrite:
        raise FtkitError("resume_from_checkpoint (--resume) and overwrite_output_dir: true contradict each "
                         "other: continue the run, or start it over, not both")
    if resume:
        if found == "finished":
            raise FtkitError(f"output_dir '{folder}' holds a finished run; there is nothing to resume (choose "
                             "another output_dir, or set overwrite_output_dir: true to train it again)")
        if isinstance(resume, str):
            if not (Path(resume) / "trainer_state.json").is_file():
                raise FtkitError(f"resume_from_checkpoint: '{resume}' is not a complete checkpoint directory "
                                 "(no trainer_state.json)")
        elif latest_checkpoint(folder) is None:
            raise FtkitError(f"output_dir '{folder}' has no complete checkpoint to resume from; train without "
                             "--resume (or resume_from_checkpoint) to start")
        return "resume"
    if found in ("missing", "empty"):
        return "fresh"
    if overwrite:
        if found == "foreign" and checkpoints(folder):
            names = ", ".join(p.name for p in checkpoints(folder)[:3])
            raise FtkitError(f"output_dir '{folder}' holds checkpoint directories ftkit did not write ({names}); "
                             "training would save and rotate its own checkpoint-N beside them: choose another "
                             "output_dir")
        return "overwrite"
    if found == "finished":
        raise FtkitError(f"output_dir '{folder}' already holds a finished run; choose another output_dir, "
                         "or set overwrite_output_dir: true to replace it")
    if found == "unfinished":
        newest = latest_checkpoint(folder)
        if newest is None:
            raise FtkitError(f"output_dir '{folder}' holds an unfinished run with no checkpoint; set "
                             "overwrite_output_dir: true to start over, or choose another output_dir")
        raise FtkitError(f"output_dir '{folder}' holds an unfinished run (newest checkpoint: {newest.name}); "
                         "continue it with `ftkit train RECIPE --resume`, or set overwrite_output_dir: true to "
                         "start over")
    names = sorted(p.name for p in folder.iterdir())[:3]
    raise FtkitError(f"output_dir '{folder}' holds files ftkit did not write ({', '.join(names)}); choose another "
                     "output_dir, or set overwrite_output_dir: true to train into it (only ftkit's own files "
                     "there are replaced)")
