"""Chat stage: load a run's adapter (or a full model) with the exact template and stop tokens it was
trained with, and answer: one-shot (--prompt), line by line from piped stdin, or an interactive REPL."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from ftkit.errors import FtkitError


@dataclass
class GenerationOptions:
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.0
    greedy: bool = False
    seed: int | None = None


def run_metadata(directory: Path) -> dict:
    """ftkit_run.json of a run dir, or of the run a checkpoint-N dir belongs to."""
    for folder in (directory, directory.parent):
        path = folder / "ftkit_run.json"
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))
    return {}


def tokenizer_dir(directory: Path) -> Path:
    for folder in (directory, directory.parent):
        if (folder / "tokenizer_config.json").is_file():
            return folder
    raise FtkitError(f"{directory}: no tokenizer saved here or in its parent run directory")


def load_for_chat(adapter: Path | None, model_dir: Path | None, base: str | None, dtype: str | None):
    """-> (model, tokenizer, ChatFormat)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftkit.data.chat_format import ChatFormat

    if (adapter is None) == (model_dir is None):
        raise FtkitError("give exactly one of --adapter RUN_DIR or --model MODEL_DIR")
    source = adapter or model_dir
    if not source.is_dir():
        raise FtkitError(f"{source}: no such directory")
    meta = run_metadata(source)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir(source)))
    if not tokenizer.chat_template:
        raise FtkitError(f"{source}: the tokenizer has no chat template; was this trained with ftkit?")
    cuda = torch.cuda.is_available()
    torch_dtype = getattr(torch, dtype) if dtype and dtype != "auto" else (torch.bfloat16 if cuda and
                                                                             torch.cuda.is_bf16_supported() else torch.float32)
    trust = bool(meta.get("trust_remote_code"))
    if adapter is not None:
        config_path = adapter / "adapter_config.json"
        if not config_path.is_file():
            raise FtkitError(f"{adapter}: no adapter_config.json; for a full fine-tune use --model {adapter}")
        base_name = base or json.loads(config_path.read_text())["base_model_name_or_path"]
        from ftkit.hub import prepare_hub_access

        prepare_hub_access([base_name], log=lambda msg: print(msg, file=sys.stderr))
        model = load_base(base_name, meta, torch_dtype, trust, cuda)
        rows = meta.get("embedding_rows") or len(tokenizer)
        if model.get_input_embeddings().weight.shape[0] != rows:
            model.resize_token_embeddings(rows, mean_resizing=False)
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype, trust_remote_code=trust)
    if cuda and not (meta.get("load_in_4bit") or meta.get("load_in_8bit")):
        model = model.to("cuda")
    model.eval()
    return model, tokenizer, ChatFormat(tokenizer, tokenizer.chat_template)


def load_base(name: str, meta: dict, torch_dtype, trust: bool, cuda: bool):
    """The adapter's base; 4-bit/8-bit as trained when a GPU is there, full precision otherwise."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = None
    if cuda and meta.get("load_in_4bit"):
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch_dtype)
    elif cuda and meta.get("load_in_8bit"):
        quant = BitsAndBytesConfig(load_in_8bit=True)
    try:
        return AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, quantization_config=quant,
                                                    trust_remote_code=trust)
    except (OSError, ValueError) as err:
        raise FtkitError(f"base model '{name}' could not be loaded ({str(err).splitlines()[0][:200]}); "
                         "pass --base with a local path") from None


def generate(model, chat_format, messages: list[dict], options: GenerationOptions, streamer=None) -> str:
    import torch

    tokenizer = chat_format.tokenizer
    prompt = chat_format.prompt(messages)
    inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(model.device)
    stop_ids = [tokenizer.convert_tokens_to_ids(s) for s in chat_format.stop_strings()]
    sampling = {} if options.greedy else dict(temperature=options.temperature, top_p=options.top_p, top_k=options.top_k)
    if options.seed is not None:
        torch.manual_seed(options.seed)
    with torch.no_grad():
        output = model.generate(
            **inputs, max_new_tokens=options.max_new_tokens, do_sample=not options.greedy,
            repetition_penalty=options.repetition_penalty, eos_token_id=stop_ids,
            pad_token_id=tokenizer.pad_token_id, streamer=streamer, **sampling,
        )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def run_chat(adapter, model_dir, base, prompt, system, options: GenerationOptions, dtype=None) -> None:
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("peft").setLevel(logging.ERROR)
    model, _, chat_format = load_for_chat(adapter, model_dir, base, dtype)
    history = [{"role": "system", "content": system}] if system else []
    if prompt is not None:
        print(generate(model, chat_format, history + [{"role": "user", "content": prompt}], options))
        return
    interactive = sys.stdin.isatty()
    if interactive:
        print("ftkit chat: type a message; /reset clears the history, /exit quits.", file=sys.stderr)
    for line in iter_input(interactive):
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history = history[:1] if system else []
            continue
        history.append({"role": "user", "content": line})
        answer = generate(model, chat_format, history, options)
        history.append({"role": "assistant", "content": answer})
        print(answer, flush=True)


def iter_input(interactive: bool):
    while True:
        try:
            line = input(">>> ") if interactive else sys.stdin.readline()
        except EOFError:
            return
        if not interactive and not line:
            return
        line = line.strip()
        if line:
            yield line
