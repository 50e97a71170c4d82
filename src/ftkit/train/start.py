"""Starting a preference run from a finished ftkit run (`model_name_or_path: runs/my-sft`).

The policy starts from the SFT model with the run's tokenizer, chat template and end-of-turn token (load_tokenizer
reads them from the run directory), and the reference model is the SFT model, never the raw base:
- a full fine-tune is a model directory: it loads as any model, and under LoRA the reference is it with the new
  adapter disabled;
- an adapter run is folded into its base first (base + the run's own earlier adapters + its adapter, merged), so
  with a new LoRA the reference is again "the adapter disabled". With load_in_4bit/8bit the merged model is written
  in full precision to a temporary folder inside output_dir and loaded quantised from there (quantising happens
  while loading; rounding the SFT adapter into 4-bit weights instead would lose it), then the folder is removed.

The run records the chain (`base_model` plus `base_adapters`, copies of the earlier adapters kept in the run under
base_adapters/N), so chat, predict, merge and serve rebuild the same base (inference/loading.run_base). The starting
run is only read, never written.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from ftkit import rundir
from ftkit.errors import FtkitError

CHAIN_DIR = "base_adapters"


def start_run(model_name_or_path: str | None) -> Path | None:
    """The finished ftkit run a recipe starts from, or None for a plain model."""
    path = Path(model_name_or_path or "").expanduser()
    if not model_name_or_path or not path.is_dir() or rundir.state(path) != "finished":
        return None
    return path


def is_adapter_run(run: Path | None) -> bool:
    return run is not None and (run / "adapter_config.json").is_file()


def chain_of(run: Path) -> list[dict]:
    """The adapters a new run on top of adapter run `run` applies to its base: the run's own base_adapters, then the
    run's adapter; each with its embedding rows and where it lives now."""
    meta = rundir.run_metadata(run)
    earlier = [{**item, "source": str(run / item["path"])} for item in meta.get("base_adapters") or []]
    return [*earlier, {"embedding_rows": meta.get("embedding_rows"), "source": str(run)}]


def start_metadata(recipe) -> dict:
    """ftkit_run.json entries of a run started from an adapter run: the raw base and the adapters merged into it."""
    run = start_run(recipe.model.model_name_or_path)
    if run is None:
        return {}
    info: dict = {"method": recipe.method, "started_from": str(run.resolve())}
    if is_adapter_run(run) and recipe.model.use_peft:
        info["base_model"] = rundir.run_metadata(run).get("base_model")
        info["base_adapters"] = [{"path": f"{CHAIN_DIR}/{i}", "embedding_rows": item["embedding_rows"]}
                                 for i, item in enumerate(chain_of(run))]
    return info


def copy_chain(recipe, out: Path) -> None:
    """Copy the adapters the run's base is made of into out/base_adapters/N, so the run stands on its own."""
    run = start_run(recipe.model.model_name_or_path)
    if not (is_adapter_run(run) and recipe.model.use_peft):
        return
    for i, item in enumerate(chain_of(run)):
        target = out / CHAIN_DIR / str(i)
        target.mkdir(parents=True, exist_ok=True)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            rundir.write_atomic(target / name, (Path(item["source"]) / name).read_bytes())


def check_start(recipe) -> None:
    """A run directory as model_name_or_path must be finished, and the recipe must not fight its template."""
    path = Path(recipe.model.model_name_or_path or "").expanduser()
    if path.is_dir() and rundir.state(path) == "unfinished":
        raise FtkitError(f"model_name_or_path '{path}' is an unfinished ftkit run; finish it with `ftkit train RECIPE "
                         "--resume`, or start from one of its checkpoints merged (ftkit merge)")


def load_policy(recipe, precision, device_index: int, out: Path, log=print):
    """The model training starts from: the base model, or the SFT model of a finished run."""
    from ftkit.train.model import load_model

    run = start_run(recipe.model.model_name_or_path)
    init = recipe.sft.get("model_init_kwargs")
    if not is_adapter_run(run):
        return load_model(recipe.model, precision, device_index, init)
    import torch

    from ftkit.inference.loading import merged_run

    log(f"starting from {run}: its adapter merged into {rundir.run_metadata(run).get('base_model')} "
        "(the reference model)")
    quantised = recipe.model.load_in_4bit or recipe.model.load_in_8bit
    dtype = getattr(torch, "float32" if quantised and precision.device == "cpu" else precision.dtype)
    model = merged_run(run, dtype, recipe.model.trust_remote_code).requires_grad_(True)  # PEFT left it frozen
    base = rundir.run_metadata(run).get("base_model")
    if not quantised:
        return keep_base_name(model, base)
    temp = out / f".ftkit-tmp-base-{device_index}"
    try:
        model.save_pretrained(str(temp))
        del model
        loaded = load_model(replace(recipe.model, model_name_or_path=str(temp)), precision, device_index, init)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return keep_base_name(loaded, base)


def keep_base_name(model, base: str | None):
    """PEFT records the model's name as the adapter's base: the raw base, not a temporary folder."""
    if base:
        model.config._name_or_path = base
        model.name_or_path = base
    return model
