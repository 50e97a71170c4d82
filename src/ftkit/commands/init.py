"""`ftkit init`: a commented starter recipe for a model and a data file, so nobody starts from a blank page.

The data file's format is detected as training detects it (data/formats.py) and its rows counted; the method is
chosen with `ftkit estimate`'s figures for the GPU memory given: LoRA on bf16 weights when it fits, else QLoRA
(4-bit), else QLoRA with a smaller batch. The recipe is checked with the same code as `ftkit validate` before it
is written, and it is written under a new name only: an existing file is never replaced.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from ftkit import __version__
from ftkit.errors import FtkitError

EFFECTIVE_BATCH = 16
MAX_LENGTH = 2048
# Column names people give questions and answers, for data in none of the known formats (question/answer):
# the starter maps them to prompt/completion with dataset_mixture's `columns`.
PROMPT_NAMES = ("question", "query", "input", "instruction", "prompt", "source", "human", "user")
ANSWER_NAMES = ("answer", "response", "output", "completion", "target", "reply", "assistant", "gpt", "bot")


@dataclass
class DataFacts:
    path: str
    format: str | None  # None: a hub dataset, detected when it loads
    rows: int | None
    columns: dict[str, str] | None = None  # a rename to prompt/completion for data in no known format


@dataclass
class Choice:
    method: str  # "lora" or "qlora"
    batch: int
    needs_gib: float | None  # estimated total for the choice; None when config.json could not be read
    why: str


def inspect_data(data: str) -> DataFacts:
    """Format and row count of a local file or folder; a hub id is left for training to detect."""
    from ftkit.data.formats import BadRow, detect_format
    from ftkit.data.loading import local_files, read_rows
    from ftkit.config.sources import SourceSpec
    from ftkit.hub import looks_local

    files = local_files(SourceSpec(path=data))
    if files is None:
        if looks_local(data):
            raise FtkitError(f"--data '{data}': no such file or folder")
        return DataFacts(data, None, None)
    rows = read_rows(files)
    columns = list(dict.fromkeys(key for row in rows[:1000] for key in row))
    try:
        return DataFacts(data, detect_format(columns), len(rows))
    except BadRow as err:
        mapping = guess_columns(columns)
        if mapping is None:
            raise FtkitError(f"--data '{data}': {err}") from None
        return DataFacts(data, "prompt_completion", len(rows), mapping)


def guess_columns(columns: list[str]) -> dict[str, str] | None:
    """{their question column: prompt, their answer column: completion} when exactly one of each is recognisable."""
    lower = {c.lower(): c for c in columns}
    prompts = [lower[n] for n in PROMPT_NAMES if n in lower]
    answers = [lower[n] for n in ANSWER_NAMES if n in lower]
    if len(prompts) != 1 or len(answers) != 1:
        return None
    return {prompts[0]: "prompt", answers[0]: "completion"}


def recipe_values(model: str, data: DataFacts, choice: Choice, output_dir: str) -> dict:
    """The keys the starter recipe sets (the text around them is in `render`)."""
    values = {"model_name_or_path": model, "use_peft": True, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
              "lora_target_modules": "all-linear"}
    if choice.method == "qlora":
        values.update(load_in_4bit=True, bnb_4bit_quant_type="nf4", use_bnb_nested_quant=True)
    if data.columns:
        values["dataset_mixture"] = {"datasets": [{"id": data.path, "columns": data.columns, "weight": 1.0}]}
    elif data.format:
        values["dataset_mixer"] = {data.path: 1.0}
    else:
        values["dataset_name"] = data.path
    if data.rows is None or data.rows >= 200:
        values["test_split_size"] = 0.05
    values.update(output_dir=output_dir, num_train_epochs=3, per_device_train_batch_size=choice.batch,
                  gradient_accumulation_steps=max(1, EFFECTIVE_BATCH // choice.batch), learning_rate=2.0e-4,
                  lr_scheduler_type="cosine", warmup_steps=0.03, max_length=MAX_LENGTH, gradient_checkpointing=True,
                  logging_steps=10, save_strategy="steps", save_steps=200, save_total_limit=2, report_to="none",
                  seed=42)
    if "test_split_size" in values:
        values.update(eval_strategy="steps", eval_steps=200)
    return values


def choose_method(model: str, data: DataFacts, gpu_gib: float) -> Choice:
    """LoRA if it fits `gpu_gib`, else QLoRA, else QLoRA at batch 1 (ftkit estimate's figures; 1 GiB kept for the
    CUDA context). Without a readable config.json: QLoRA, which fits the most."""
    from ftkit.config.memory import CUDA_CONTEXT_GIB, GIB, estimate, setup_from_recipe
    from ftkit.config.recipe import load_recipe
    from ftkit.hub import read_model_config

    try:
        config, _ = read_model_config(model)
    except FtkitError as err:
        return Choice("qlora", 4, None, f"QLoRA, which needs the least memory; the size could not be estimated "
                      f"({err.lines[0]})")
    usable = gpu_gib - CUDA_CONTEXT_GIB
    needs = {}
    for method, batch in (("lora", 4), ("qlora", 4), ("qlora", 1)):
        recipe = load_recipe(None, raw=recipe_values(model, data, Choice(method, batch, None, ""), "runs/x"))
        needs[method, batch] = estimate(config, setup_from_recipe(recipe))["bytes"]["total"] / GIB
        if needs[method, batch] <= usable:
            break
    (method, batch), total = list(needs.items())[-1]
    lora, room = needs["lora", 4], f"the {usable:g} GiB a {gpu_gib:g} GiB GPU leaves after the CUDA context"
    if method == "lora" and total <= usable:
        why = f"LoRA: it needs about {total:.1f} GiB of {room}"
    elif total <= usable:
        why = (f"QLoRA (4-bit base): LoRA would need about {lora:.1f} GiB, more than {room}; QLoRA needs "
               f"about {total:.1f} GiB" + (" at batch 1" if batch == 1 else ""))
    else:
        why = (f"QLoRA at batch 1, and even that needs about {total:.1f} GiB, more than {room}: lower "
               "max_length, or train on a bigger GPU")
    return Choice(method, batch, total, why)


def y(value) -> str:
    """One YAML scalar or flow value, quoted where YAML needs it."""
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10**6, sort_keys=False).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def shown(text: str) -> str:
    """A path as a shell word, on one line (it goes into comments and commands to copy)."""
    import shlex

    return shlex.quote(str(text)).replace("\n", "\\n").replace("\r", "\\r")


def render(values: dict, data: DataFacts, choice: Choice, gpu_gib: float, recipe_name: str) -> str:
    v, recipe_name = values, shown(recipe_name)
    method = "QLoRA: a LoRA adapter on a 4-bit base" if choice.method == "qlora" else "LoRA adapter on bf16 weights"
    described = (f"{data.format} format, {data.rows:,} rows" if data.format else
                 "a hub dataset: its format is detected when it loads")
    if data.columns:
        described = f"{', '.join(data.columns)} read as prompt/completion, {data.rows:,} rows"
    lines = [f"# Starter recipe from `ftkit init` (ftkit {__version__}, {time.strftime('%Y-%m-%d')}).",
             f"# Method for a {gpu_gib:g} GiB GPU: {choice.why} (ftkit estimate {recipe_name}).",
             "# Every key and its help: `ftkit keys`; one key in full: `ftkit keys lora_r`.",
             f"# Next: ftkit validate {recipe_name} && ftkit preview {recipe_name} && ftkit train {recipe_name}", "",
             "# --- model", f"model_name_or_path: {y(v['model_name_or_path'])}",
             "# dtype: bfloat16                 # default: bf16 on GPUs that support it, else float32",
             "# attn_implementation: sdpa       # flash_attention_2 when flash-attn is installed (ftkit doctor)", "",
             f"# --- method: {method}", "use_peft: true"]
    if choice.method == "qlora":
        lines += ["load_in_4bit: true", "bnb_4bit_quant_type: nf4", "use_bnb_nested_quant: true"]
    lines += ["lora_r: 16", "lora_alpha: 32                     # scale = alpha / r",
              "lora_dropout: 0.05", "lora_target_modules: all-linear", "",
              f"# --- data: {shown(data.path)} ({described})"]
    if data.columns:
        lines += ["dataset_mixture:", "  datasets:", f"    - id: {y(data.path)}",
                  f"      columns: {y(data.columns)}      # your columns renamed to prompt/completion",
                  "      weight: 1.0"]
    elif data.format:
        lines += ["dataset_mixer:                     # source: weight (<= 1 a fraction, > 1 a number of rows)",
                  f"  {y(data.path)}: 1.0"]
    else:
        lines.append(f"dataset_name: {y(data.path)}")
    if data.format == "text":
        lines.append("# plain text: every token carries loss (continued pre-training)")
    if "test_split_size" in v:
        lines.append("test_split_size: 0.05              # eval split carved from the rows: eval loss, before/after "
                     "answers")
    else:
        lines.append("# test_split_size: 0.05            # too few rows to spare an eval split by default")
    lines += ["# chat_template: chatml            # default: the tokenizer's own template, else alpaca",
              "# system_prompt: You are a helpful assistant.", "",
              "# --- training (TRL SFTConfig keys)", f"output_dir: {y(v['output_dir'])}",
              "num_train_epochs: 3", f"per_device_train_batch_size: {v['per_device_train_batch_size']}",
              f"gradient_accumulation_steps: {v['gradient_accumulation_steps']}      # effective batch "
              f"{v['per_device_train_batch_size'] * v['gradient_accumulation_steps']} per GPU",
              "learning_rate: 2.0e-4", "lr_scheduler_type: cosine",
              "warmup_steps: 0.03                 # below 1: a fraction of the steps",
              f"max_length: {MAX_LENGTH}                   # longer samples are truncated (overlong: drop to leave "
              "them out)", "gradient_checkpointing: true       # less memory, about 20% slower",
              "logging_steps: 10"]
    if "eval_strategy" in v:
        lines += ["eval_strategy: steps", "eval_steps: 200"]
    lines += ["save_strategy: steps", "save_steps: 200", "save_total_limit: 2",
              "report_to: none                    # tensorboard or wandb to follow the curves", "seed: 42", ""]
    return "\n".join(lines)


def write_new(path: Path, text: str) -> None:
    """Write `path` only if it does not exist, atomically: a temporary file hard-linked to the name (the link fails
    on an existing file, whoever created it meanwhile)."""
    tmp = path.with_name(f".ftkit-tmp-{os.getpid()}-{path.name}")
    tmp.write_text(text, encoding="utf-8")
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FtkitError(f"{path} already exists; ftkit init never replaces a file: choose another --output") from None
    finally:
        tmp.unlink()


def run_init(model: str, data: str, output: Path, gpu_memory: float = 24, echo=print) -> Path:
    from ftkit.config.recipe import load_recipe
    from ftkit.files import check_arg_text

    for value, option in ((model, "--model"), (data, "--data"), (str(output), "--output")):
        check_arg_text(value, option)  # a recipe is UTF-8 YAML: a name it cannot hold is refused here
        if not value.strip():
            raise FtkitError(f"{option} is empty: give a path or a hub name")
    output = Path(output)
    if output.exists() or output.is_symlink():
        raise FtkitError(f"{output} already exists; ftkit init never replaces a file: choose another --output")
    if output.suffix.lower() not in (".yml", ".yaml"):
        raise FtkitError(f"--output '{output}': a recipe is a .yml or .yaml file")
    if not output.parent.is_dir():
        raise FtkitError(f"--output '{output}': folder {output.parent} does not exist")
    if not 0 < gpu_memory < 10**6:
        raise FtkitError(f"--gpu-memory must be a positive number of GiB, got {gpu_memory}")
    from ftkit.hub import looks_local

    if looks_local(model) and not Path(model).expanduser().is_dir():
        raise FtkitError(f"--model '{model}': no such directory (a hub model is named like org/name)")
    facts = inspect_data(data)
    choice = choose_method(model, facts, gpu_memory)
    values = recipe_values(model, facts, choice, f"runs/{output.stem}")
    text = render(values, facts, choice, gpu_memory, str(output))
    if yaml.safe_load(text) != values:  # the comments must not change what the recipe says
        raise AssertionError("ftkit init: the rendered recipe differs from its values")
    load_recipe(output, raw=values)  # as `ftkit validate` checks it: model path, data path, every value
    write_new(output, text)
    name = shown(str(output))
    echo(f"wrote {name}: {choice.why}; data {facts.format or 'from the hub'}"
         + (f", {facts.rows:,} rows" if facts.rows is not None else ""))
    echo(f"next: ftkit validate {name} && ftkit preview {name} && ftkit train {name}")
    return output
