"""Merge stage: fold a LoRA/DoRA adapter into its base weights and save a standalone model directory.

The base always loads unquantised (a 4-bit QLoRA base is re-read in full precision: merging into
quantised weights would lose the adapter's update), in --dtype, else the base's own dtype. The result
holds safetensors shards, the tokenizer with the run's chat template, generation_config.json that stops at
the end-of-turn token, ftkit_run.json (so `ftkit chat --model` works) and a README.md model card.

The merge is written into a temporary sibling (`DIR.ftkit-tmp-PID`, marked as ftkit's merge output first and
finished last) and renamed into place when complete. --output is never the adapter, the base or a directory
containing either; an existing --output is replaced only with --overwrite, only when it is an earlier ftkit
merge output, and only when it holds nothing else.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
from pathlib import Path

import yaml

from ftkit import rundir
from ftkit.errors import FtkitError

# What a merge writes into its output; --overwrite replaces a directory holding only these.
MERGE_FILES = (*rundir.RUN_ARTIFACTS, "README.md")
# save_pretrained's sizes (huggingface_hub's parser is private): a number and a unit.
SHARD_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*[KMGT]B\s*$", re.IGNORECASE)


def merge_dtype(dtype: str | None, base_name: str, trust: bool):
    """--dtype, else the dtype the base's config records, else float32."""
    import torch

    from ftkit.config.precision import CPU, inference_dtype

    if dtype and dtype != "auto":
        return getattr(torch, inference_dtype(dtype, CPU))
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(base_name, trust_remote_code=trust)
        stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    except (OSError, ValueError):
        stored = None
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if stored in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


def adapter_base(adapter: Path, base: str | None) -> str:
    """The base model's name: --base, else the adapter's own record of it."""
    if not adapter.is_dir():
        raise FtkitError(f"{adapter}: no such directory")
    config_path = adapter / "adapter_config.json"
    if not config_path.is_file():
        raise FtkitError(f"{adapter}: no adapter_config.json, so nothing to merge "
                         "(a full fine-tune is already a standalone model: ftkit chat --model DIR)")
    if base:
        return base
    try:
        return str(json.loads(config_path.read_text(encoding="utf-8"))["base_model_name_or_path"])
    except (ValueError, KeyError, TypeError):
        raise FtkitError(f"{config_path}: not a readable adapter config (no base_model_name_or_path); pass --base "
                         "with the base model") from None


def check_output(output: Path, adapter: Path, base_name: str, overwrite: bool) -> None:
    """--output never is, or contains, the adapter or the base; an existing one is replaced only when it is an
    earlier ftkit merge output holding nothing else, and --overwrite says so."""
    out = output.expanduser().resolve()
    for what, source in (("the adapter being merged", adapter), ("the base model", Path(base_name).expanduser())):
        if source.exists() and (source.resolve() == out or out in source.resolve().parents):
            verb = "is" if source.resolve() == out else "contains"
            raise FtkitError(f"--output '{output}' {verb} {what} ({source}); choose a directory outside it")
    rundir.check_writable(output, "--output")
    if not output.exists() or not any(output.iterdir()):
        return
    owner = rundir.read_marker(output, rundir.OWNER) or {}
    names = sorted(p.name for p in output.iterdir())
    if owner.get("kind") != "merge":
        raise FtkitError(f"{output}: already exists and holds files ftkit merge did not write "
                         f"({', '.join(names[:3])}); choose another --output (--overwrite replaces only an earlier "
                         "ftkit merge output)")
    if not overwrite:
        raise FtkitError(f"{output}: already exists and is not empty; choose another --output or pass --overwrite")
    others = [n for n in names if not any(fnmatch.fnmatch(n, pattern) for pattern in MERGE_FILES)]
    if others:
        raise FtkitError(f"{output}: besides the earlier merge it holds {', '.join(others[:3])}, which --overwrite "
                         "would delete; move them out, or choose another --output")


def run_merge(adapter: Path, output: Path, base: str | None = None, dtype: str | None = None,
              max_shard_size: str = "5GB", overwrite: bool = False, trust_remote_code: bool = False,
              log=print) -> Path:
    from ftkit.inference.loading import check_remote_code, load_adapter_model, open_tokenizer, quiet_loading

    adapter, output = Path(adapter), Path(output)
    base_name = adapter_base(adapter, base)
    size = SHARD_SIZE.match(max_shard_size)
    if not size or not float(size.group(1)) > 0:
        raise FtkitError(f"--max-shard-size {max_shard_size!r}: expected a size such as 5GB or 500MB (KB, MB, GB, TB)")
    check_output(output, adapter, base_name, overwrite)
    rundir.require_finished(adapter)
    quiet_loading()
    meta = rundir.run_metadata(adapter)
    check_remote_code(meta, trust_remote_code)
    torch_dtype = merge_dtype(dtype, base_name, trust_remote_code)
    tokenizer = open_tokenizer(adapter)
    log(f"loading {base_name} ({str(torch_dtype).removeprefix('torch.')}, unquantised) with the adapter from {adapter}")
    model = load_adapter_model(adapter, base, meta, tokenizer, torch_dtype, quant=None,
                               trust_remote_code=trust_remote_code)
    model = model.merge_and_unload(safe_merge=True)
    untie_if_diverged(model)
    model.config.use_cache = True
    run = {**meta, "peft": False, "load_in_4bit": False, "load_in_8bit": False,
           "dtype": str(torch_dtype).removeprefix("torch."), "merged_from": str(adapter), "base_model": base_name,
           "embedding_rows": model.get_input_embeddings().weight.shape[0]}
    final = output.expanduser().resolve()
    staging = final.with_name(f"{final.name}.ftkit-tmp-{os.getpid()}")
    try:
        rundir.claim(staging, "merge")
        model.save_pretrained(str(staging), max_shard_size=max_shard_size)
        tokenizer.save_pretrained(str(staging))
        copy_run_files(adapter, staging)
        (staging / "README.md").write_text(model_card(adapter, base_name, output, run), encoding="utf-8")
        rundir.finish(staging, run)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    put_in_place(staging, final)
    log(f"merged model saved to {output}/ (next: ftkit chat --model {output})")
    return output


def copy_run_files(adapter: Path, folder: Path) -> None:
    """The run's generation config (eos lists the end-of-turn token), resolved recipe and training summary."""
    for name in ("generation_config.json", "ftkit_recipe.yml", "train_summary.json"):
        found = rundir.run_file(adapter, name)
        if found:
            shutil.copyfile(found, folder / name)


def put_in_place(staging: Path, final: Path) -> None:
    """Rename the complete merge into place; an earlier one (checked to hold only merge files) goes after."""
    if not final.exists():
        os.replace(staging, final)
        return
    old = final.with_name(f"{final.name}.ftkit-old-{os.getpid()}")
    os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old)


def untie_if_diverged(model) -> None:
    """A tied-embedding base whose embed_tokens and lm_head were trained separately (modules_to_save)
    would be saved with only one of them; untie so both are kept."""
    import torch

    if not getattr(model.config, "tie_word_embeddings", False):
        return
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if outputs is None or inputs.weight is outputs.weight:
        return
    if inputs.weight.shape != outputs.weight.shape or not torch.equal(inputs.weight, outputs.weight):
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False


def model_card(adapter: Path, base_name: str, output: Path, run: dict) -> str:
    """README.md: huggingface_hub's card metadata (base model, library, tags), then how it was made and used."""
    from huggingface_hub import ModelCard, ModelCardData

    from ftkit.rundir import run_file

    recipe_path, summary_path = run_file(adapter, "ftkit_recipe.yml"), run_file(adapter, "train_summary.json")
    recipe = yaml.safe_load(recipe_path.read_text(encoding="utf-8")) if recipe_path else {}
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path else {}
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    method = "DoRA" if adapter_config.get("use_dora") else "LoRA"
    if run.get("load_in_4bit") or recipe.get("load_in_4bit"):
        method = f"Q{method} (4-bit)"
    data = ModelCardData(base_model=base_name, library_name="transformers", tags=["ftkit", "fine-tuned", "merged"])
    lines = [f"# {output.name}", "",
             f"`{base_name}` fine-tuned with ftkit ({method}, r={adapter_config.get('r')}, "
             f"alpha={adapter_config.get('lora_alpha')}), adapter from `{adapter}` merged into the base weights "
             f"({run['dtype']}).", "", "## Use", "", "```bash", f"ftkit chat --model {output}", "```", "",
             "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
             f"tokenizer = AutoTokenizer.from_pretrained({str(output)!r})",
             f"model = AutoModelForCausalLM.from_pretrained({str(output)!r})",
             "prompt = tokenizer.apply_chat_template([{'role': 'user', 'content': 'Hi'}], add_generation_prompt=True, "
             "return_tensors='pt', return_dict=True)",
             "print(tokenizer.decode(model.generate(**prompt)[0], skip_special_tokens=True))", "```", "",
             f"The chat template is the one used in training (`chat_template.jinja`); `generation_config.json` "
             f"stops at the end-of-turn token `{run.get('end_of_turn')}`.", ""]
    if run.get("chat_template_kwargs"):
        lines += [f"It was trained with the chat template variables `{json.dumps(run['chat_template_kwargs'])}`: "
                  "pass them to `apply_chat_template` too (ftkit chat, predict and serve do).", ""]
    lines += card_data_section(recipe, summary) + card_results(summary)
    kept = {k: v for k, v in recipe.items() if v is not None and v is not False and v != []}
    if kept:
        lines += ["", "## Recipe", "", "```yaml", yaml.safe_dump(kept, sort_keys=False, allow_unicode=True).rstrip(),
                  "```"]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"))


def card_data_section(recipe: dict, summary: dict) -> list[str]:
    sources = {k: recipe[k] for k in ("dataset_mixer", "dataset_mixture", "dataset_name", "system_prompt")
               if recipe.get(k)}
    lines = ["## Data", ""]
    if sources:
        lines += ["```yaml", yaml.safe_dump(sources, sort_keys=False, allow_unicode=True).rstrip(), "```"]
    else:
        lines += ["(no ftkit_recipe.yml found)"]
    data = summary.get("data") or {}
    if data:
        lines += ["", f"Rows: {data.get('train_rows')} train, {data.get('eval_rows')} eval; "
                      f"{data.get('trained_tokens')} trained tokens per epoch."]
    return lines


def card_results(summary: dict) -> list[str]:
    lines = ["", "## Training results", ""]
    metrics = [("steps", summary.get("global_step")), ("epochs", summary.get("epochs")),
               ("first train loss", summary.get("first_train_loss")),
               ("final train loss", summary.get("final_train_loss")),
               ("final eval loss", summary.get("final_eval_loss")), ("tokens seen", summary.get("tokens_seen")),
               ("train runtime (s)", summary.get("train_runtime_s")), ("seed", summary.get("seed"))]
    samples = summary.get("eval_samples") or {}
    for when in ("before", "after"):
        for key, value in (samples.get(when) or {}).items():
            metrics.append((f"eval samples {key} ({when} training)", value))
    shown = [(name, value) for name, value in metrics if value is not None]
    if not shown:
        return lines + ["(no train_summary.json found)"]
    return lines + ["| metric | value |", "| --- | --- |"] + [
        f"| {name} | {round(value, 4) if isinstance(value, float) else value} |" for name, value in shown]
