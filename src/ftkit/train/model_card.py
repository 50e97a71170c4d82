"""The run directory's README.md: a model card people can share (huggingface_hub's ModelCard, so the hub reads
its metadata), instead of PEFT's empty template. It says what was trained on what (base model, method, data
sources with row counts, the recipe's key settings), how it went (losses, perplexity, before/after scores),
how to load it with transformers/PEFT and serve it (`ftkit serve`, vLLM), and with which versions.

A README.md that ftkit did not write is never replaced (rundir.is_ftkit_card): the card then goes to
ftkit_model_card.md beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

from ftkit import __version__, rundir
from ftkit.hub import looks_local
from ftkit.versions import versions

SETTINGS = ("learning_rate", "lr_scheduler_type", "warmup_steps", "num_train_epochs", "max_steps",
            "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "packing", "optim",
            "weight_decay", "neftune_noise_alpha", "gradient_checkpointing", "seed")


def method_name(recipe, adapter_config: dict | None) -> str:
    m = recipe.model
    if not m.use_peft:
        return "full fine-tune (every weight trained)"
    kind = "DoRA" if m.use_dora else "rsLoRA" if m.use_rslora else "LoRA"
    if m.load_in_4bit:
        return f"QLoRA: {kind} on a 4-bit {m.bnb_4bit_quant_type} base" + (" (double quantisation)"
                                                                            if m.use_bnb_nested_quant else "")
    return f"{kind} on an 8-bit base" if m.load_in_8bit else kind


def table(rows: list[tuple[str, object]], head: tuple[str, str] = ("", "")) -> list[str]:
    def cell(value: object) -> str:
        text = (f"{value:.4g}" if isinstance(value, float) else str(value).lower() if isinstance(value, bool)
                else str(value))
        return text.replace("|", "\\|").replace("\n", " ")

    return [f"| {head[0]} | {head[1]} |", "| --- | --- |"] + [f"| {cell(k)} | {cell(v)} |" for k, v in rows]


def method_section(recipe, adapter_config: dict | None, meta: dict, trainable: int, total: int) -> list[str]:
    rows: list[tuple[str, object]] = [("method", method_name(recipe, adapter_config))]
    if adapter_config:
        targets = adapter_config.get("target_modules")
        rows += [("rank r", adapter_config.get("r")), ("alpha", adapter_config.get("lora_alpha")),
                 ("dropout", adapter_config.get("lora_dropout")),
                 ("target modules", ", ".join(sorted({t.rsplit(".", 1)[-1] for t in targets}))
                  if isinstance(targets, list) else targets),
                 ("trained in full", ", ".join(adapter_config.get("modules_to_save") or []) or "none")]
    rows += [("trainable parameters", f"{trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)"),
             ("weights dtype", meta.get("dtype")), ("end-of-turn token", f"`{meta.get('end_of_turn')}`")]
    return ["## Method", ""] + table(rows, ("setting", "value"))


def data_section(recipe, summary: dict) -> list[str]:
    data = summary.get("data") or {}
    used = data.get("rows_per_source") or {}
    rows = [(f"`{source}`", f"{available:,} available, {used.get(source, 0):,} used")
            for source, available in (data.get("rows_in_per_source") or {}).items()]
    share = 100 * (data.get("trained_tokens") or 0) / max(data.get("tokens") or 1, 1)
    lines = ["## Data", ""] + table(rows, ("source", "rows")) + [""]
    lines.append(f"{data.get('train_rows', 0):,} train and {data.get('eval_rows', 0):,} eval samples; "
                 f"{data.get('trained_tokens', 0):,} of {data.get('tokens', 0):,} tokens carry loss ({share:.0f}%, "
                 f"`train_on: {recipe.data.train_on}`).")
    dropped = {"truncated": data.get("truncated"), "dropped as too long": data.get("dropped_overlong"),
               "dropped without loss tokens": data.get("dropped_no_loss"), "bad rows skipped": data.get("skipped_bad_rows")}
    counted = [f"{n:,} {what}" for what, n in dropped.items() if n]
    if counted:
        lines.append("Samples " + ", ".join(counted) + ".")
    template = recipe.data.chat_template or "the tokenizer's own"
    lines.append(f"Chat template: {template if len(template) < 40 else 'inline Jinja'} (saved as chat_template.jinja)"
                 + (f"; system prompt: \"{recipe.data.system_prompt}\"" if recipe.data.system_prompt else "") + ".")
    return lines


def settings_section(recipe, world_size: int) -> list[str]:
    rows = [(f"`{key}`", recipe.sft_value(key)) for key in SETTINGS if key in recipe.sft or key in
            ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "seed")]
    batch = recipe.sft_value("per_device_train_batch_size") * recipe.sft_value("gradient_accumulation_steps")
    rows.append(("effective batch", f"{batch * world_size} ({world_size} process(es))"))
    return ["## Training settings", ""] + table(rows, ("key", "value")) + [
        "", "The whole resolved recipe is `ftkit_recipe.yml`; `ftkit train ftkit_recipe.yml` trains it again."]


def results_section(summary: dict) -> list[str]:
    rows: list[tuple[str, object]] = [("steps", summary.get("global_step")), ("epochs", summary.get("epochs"))]
    if summary.get("final_train_loss") is not None:
        rows.append(("train loss (first → final)",
                     f"{summary['first_train_loss']:.4f} → {summary['final_train_loss']:.4f}"))
    if summary.get("final_eval_loss") is not None:
        rows.append(("eval loss", summary["final_eval_loss"]))
        rows.append(("eval perplexity", summary.get("final_eval_perplexity")))
    samples = summary.get("eval_samples") or {}
    for metric, label in (("exact_match", "exact match"), ("chrf", "chrF")):
        before, after = (samples.get("before") or {}).get(metric), (samples.get("after") or {}).get(metric)
        if before is not None and after is not None:
            rows.append((f"eval samples {label} (before → after)", f"{before:.3g} → {after:.3g}"))
    rows += [("train runtime", f"{summary.get('train_runtime_s', 0):.1f} s"),
             ("tokens/s", f"{summary.get('tokens_per_second') or 0:,.0f}"),
             ("peak memory", f"{summary.get('peak_memory_mb', 0):,.0f} MB")]
    lines = ["## Results", ""] + table([(k, v) for k, v in rows if v is not None], ("", "value"))
    lines += [f"- warning: {w}" for w in summary.get("warnings") or []]
    lines += ["", "![loss curve](loss_curve.svg)"]
    if samples:
        lines += ["", f"Before/after answers to {samples.get('count')} eval prompts: `samples.md`."]
    return lines


def usage_section(out: Path, meta: dict, adapter: bool, base: str) -> list[str]:
    where = str(out.resolve())
    system = meta.get("system_prompt")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "Hello!"}]
    load = ([f"tokenizer = AutoTokenizer.from_pretrained({where!r})",
             f"base = AutoModelForCausalLM.from_pretrained({base!r})",
             f"base.resize_token_embeddings({meta.get('embedding_rows')})  # the size it was trained with",
             f"model = PeftModel.from_pretrained(base, {where!r})"] if adapter else
            [f"tokenizer = AutoTokenizer.from_pretrained({where!r})",
             f"model = AutoModelForCausalLM.from_pretrained({where!r})"])
    imports = ["from transformers import AutoModelForCausalLM, AutoTokenizer"]
    if adapter:
        imports.insert(0, "from peft import PeftModel")
    flag = "--adapter" if adapter else "--model"
    lines = ["## Use it", "", "```bash", f"ftkit chat {flag} {where}", "```", "", "With transformers"
             + (" and PEFT" if adapter else "") + " (the chat template and the end-of-turn stop are saved here):", "",
             "```python", *imports, *load,
             f"messages = {json.dumps(messages, ensure_ascii=False)}",
             "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
             "return_dict=True)",
             "output = model.generate(**inputs, max_new_tokens=256)",
             "print(tokenizer.decode(output[0][inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))", "```"]
    if meta.get("load_in_4bit") or meta.get("load_in_8bit"):
        lines += ["", "It was trained on a quantised base: pass `quantization_config=BitsAndBytesConfig(...)` with "
                  f"`{json.dumps(meta.get('quantization'))}` to `from_pretrained` for the same behaviour."]
    return lines


def serving_section(out: Path, adapter: bool) -> list[str]:
    from ftkit.inference.vllm import production_line

    flag = "--adapter" if adapter else "--model"
    line, note = production_line(out if adapter else None, None if adapter else out, None, out.name)
    lines = ["## Serve it", "", "```bash", f"ftkit serve {flag} {out.resolve()} --port 8000   # OpenAI-compatible, "
             "for development", line + "   # production", "```"]
    return lines + (["", note + "."] if note else [])


def card(recipe, summary: dict, meta: dict, out: Path, trainable: int, total: int, world_size: int) -> str:
    """README.md's text for a finished run."""
    from huggingface_hub import ModelCard, ModelCardData

    adapter_path = out / "adapter_config.json"
    adapter_config = json.loads(adapter_path.read_text(encoding="utf-8")) if adapter_path.is_file() else None
    base = meta.get("base_model") or recipe.model.model_name_or_path
    hub_data = [s for s in data_sources(recipe) if not looks_local(s)]
    metadata = ModelCardData(base_model=None if looks_local(base) else base,
                             library_name="peft" if adapter_config else "transformers", pipeline_tag="text-generation",
                             tags=["ftkit", "trl", "sft", "lora" if adapter_config else "full-fine-tune"]
                             + (["qlora"] if recipe.model.load_in_4bit else []), datasets=hub_data or None)
    lines = [rundir.CARD_MARK, "", f"# {out.name}", "",
             f"`{base}` fine-tuned with ftkit {__version__}: {method_name(recipe, adapter_config)}.",
             "", *method_section(recipe, adapter_config, meta, trainable, total), "", *data_section(recipe, summary),
             "", *settings_section(recipe, world_size), "", *results_section(summary), "",
             *usage_section(out, meta, bool(adapter_config), base), "", *serving_section(out, bool(adapter_config)),
             "", "## Framework versions", ""]
    shown = ("ftkit", "torch", "transformers", "trl", "peft", "datasets", "accelerate") + (
        ("bitsandbytes",) if recipe.model.load_in_4bit or recipe.model.load_in_8bit else ())
    lines += [f"- {name} {version}" for name, version in {"ftkit": __version__, **versions()}.items()
              if version and name in shown]
    return str(ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"))


def data_sources(recipe) -> list[str]:
    from ftkit.config.sources import sources_from_recipe

    return [spec.path for spec in sources_from_recipe(recipe.data)]


def write_card(out: Path, text: str, log=print) -> Path:
    """README.md, unless a README.md that ftkit did not write is there: then ftkit_model_card.md."""
    target = out / "README.md"
    if target.exists() and not rundir.is_ftkit_card(target):
        target = out / rundir.CARD_ASIDE
        log(f"note: {out / 'README.md'} is not ftkit's and was kept; the model card is {target}")
    rundir.write_atomic(target, text)
    return target
