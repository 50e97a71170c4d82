"""Merge stage: fold a LoRA/DoRA adapter into its base weights and save a standalone model directory.

The base always loads unquantised (a 4-bit QLoRA base is re-read in full precision: merging into
quantised weights would lose the adapter's update), in --dtype, else the base's own dtype. The result
holds safetensors shards, the tokenizer with the run's chat template, generation_config.json that stops at
the end-of-turn token, ftkit_run.json (so `ftkit chat --model` works) and a README.md model card.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from ftkit.errors import FtkitError


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


def run_merge(adapter: Path, output: Path, base: str | None = None, dtype: str | None = None,
              max_shard_size: str = "5GB", overwrite: bool = False, trust_remote_code: bool = False,
              log=print) -> Path:
    from ftkit.inference.loading import check_remote_code, load_adapter_model, open_tokenizer, quiet_loading
    from ftkit.rundir import require_finished
    from ftkit.rundir import run_file, run_metadata

    adapter, output = Path(adapter), Path(output)
    if not adapter.is_dir():
        raise FtkitError(f"{adapter}: no such directory")
    config_path = adapter / "adapter_config.json"
    if not config_path.is_file():
        raise FtkitError(f"{adapter}: no adapter_config.json, so nothing to merge "
                         "(a full fine-tune is already a standalone model: ftkit chat --model DIR)")
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise FtkitError(f"{output}: already exists and is not empty; choose another --output or pass --overwrite")
    if output.resolve() in (adapter.resolve(), adapter.resolve().parent):
        raise FtkitError(f"{output}: would overwrite the run being merged; choose another --output")
    require_finished(adapter)
    quiet_loading()
    meta = run_metadata(adapter)
    check_remote_code(meta, trust_remote_code)
    base_name = base or json.loads(config_path.read_text())["base_model_name_or_path"]
    torch_dtype = merge_dtype(dtype, base_name, trust_remote_code)
    tokenizer = open_tokenizer(adapter)
    log(f"loading {base_name} ({str(torch_dtype).removeprefix('torch.')}, unquantised) with the adapter from {adapter}")
    model = load_adapter_model(adapter, base, meta, tokenizer, torch_dtype, quant=None,
                               trust_remote_code=trust_remote_code)
    model = model.merge_and_unload(safe_merge=True)
    untie_if_diverged(model)
    model.config.use_cache = True
    if output.exists() and overwrite:
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(output), max_shard_size=max_shard_size)
    tokenizer.save_pretrained(str(output))
    generation = run_file(adapter, "generation_config.json")
    if generation:  # the run's: eos lists the end-of-turn token
        shutil.copyfile(generation, output / "generation_config.json")
    run = {**meta, "peft": False, "load_in_4bit": False, "load_in_8bit": False,
           "dtype": str(torch_dtype).removeprefix("torch."), "merged_from": str(adapter), "base_model": base_name,
           "embedding_rows": model.get_input_embeddings().weight.shape[0]}
    (output / "ftkit_run.json").write_text(json.dumps(run, indent=2), encoding="utf-8")
    for name in ("ftkit_recipe.yml", "train_summary.json"):
        found = run_file(adapter, name)
        if found:
            shutil.copyfile(found, output / name)
    (output / "README.md").write_text(model_card(adapter, base_name, output, run), encoding="utf-8")
    log(f"merged model saved to {output}/ (next: ftkit chat --model {output})")
    return output


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
    from ftkit.rundir import run_file

    recipe_path, summary_path = run_file(adapter, "ftkit_recipe.yml"), run_file(adapter, "train_summary.json")
    recipe = yaml.safe_load(recipe_path.read_text(encoding="utf-8")) if recipe_path else {}
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path else {}
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    method = "DoRA" if adapter_config.get("use_dora") else "LoRA"
    if run.get("load_in_4bit") or recipe.get("load_in_4bit"):
        method = f"Q{method} (4-bit)"
    lines = ["---", f"base_model: {json.dumps(base_name)}", "library_name: transformers",
             "tags: [ftkit, fine-tuned, merged]", "---", "", f"# {output.name}", "",
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
    sources = {k: recipe[k] for k in ("dataset_mixer", "dataset_mixture", "dataset_name", "system_prompt")
               if recipe.get(k)}
    lines += ["## Data", ""]
    if sources:
        lines += ["```yaml", yaml.safe_dump(sources, sort_keys=False, allow_unicode=True).rstrip(), "```"]
    else:
        lines += ["(no ftkit_recipe.yml found)"]
    data = summary.get("data") or {}
    if data:
        lines += ["", f"Rows: {data.get('train_rows')} train, {data.get('eval_rows')} eval; "
                      f"{data.get('trained_tokens')} trained tokens per epoch."]
    lines += ["", "## Training results", ""]
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
    if shown:
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| {name} | {round(value, 4) if isinstance(value, float) else value} |" for name, value in shown]
    else:
        lines += ["(no train_summary.json found)"]
    kept = {k: v for k, v in recipe.items() if v is not None and v is not False and v != []}
    if kept:
        lines += ["", "## Recipe", "", "```yaml", yaml.safe_dump(kept, sort_keys=False, allow_unicode=True).rstrip(),
                  "```"]
    return "\n".join(lines) + "\n"
