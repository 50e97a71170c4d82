"""Load a finished run (an adapter on its base, or a full or merged model) with the tokenizer, chat template
and precision it was trained with. Remote code runs only when the caller passes trust_remote_code: a run
directory copied from elsewhere must not be able to decide that for the user."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ftkit import rundir
from ftkit.config import quantization
from ftkit.config.precision import detect_hardware, inference_dtype
from ftkit.errors import FtkitError


def default_system(directory: Path, system: str | None) -> str | None:
    """--system if given ("" for none), else the system prompt the run was trained with."""
    if system is not None:
        return system or None
    return rundir.run_metadata(directory).get("system_prompt")


def quantization_for(meta: dict, cuda: bool, dtype: str | None, torch_dtype):
    """A 4-bit (8-bit) trained adapter loads quantised as it was trained (quant type, nested quant, storage)
    on a GPU unless --dtype names a precision; on CPU, or with --dtype, the base loads unquantised."""
    if not cuda or (dtype and dtype != "auto"):
        return None
    quant = meta.get("quantization")
    if quant is None and (meta.get("load_in_4bit") or meta.get("load_in_8bit")):  # runs written by ftkit 0.1
        quant = {"load_in_8bit": True} if meta.get("load_in_8bit") else {"load_in_4bit": True}
    return quantization.bnb_config(quant, str(torch_dtype).removeprefix("torch."))


def check_remote_code(meta: dict, trust_remote_code: bool) -> None:
    if meta.get("trust_remote_code") and not trust_remote_code:
        raise FtkitError("this run's model needs its own Python code from the hub (the recipe had "
                         "trust_remote_code: true); pass --trust-remote-code to run that code now")


def tokenizer_dir(directory: Path) -> Path:
    for folder in (directory, directory.parent):
        if (folder / "tokenizer_config.json").is_file():
            return folder
    raise FtkitError(f"{directory}: no tokenizer saved here or in its parent run directory")


def open_tokenizer(source: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir(source)))
    if not tokenizer.chat_template:
        raise FtkitError(f"{source}: the tokenizer has no chat template; was this trained with ftkit?")
    return tokenizer


def load_for_chat(adapter: Path | None, model_dir: Path | None, base: str | None, dtype: str | None,
                  trust_remote_code: bool = False, template_kwargs: dict | None = None):
    """-> (model, tokenizer, ChatFormat) of a finished run, a checkpoint of one, or a model directory. The chat
    template renders with the chat_template_kwargs the run was trained with, `template_kwargs` added over them."""
    import torch
    from transformers import AutoModelForCausalLM

    from ftkit.data.chat_format import ChatFormat

    if (adapter is None) == (model_dir is None):
        raise FtkitError("give exactly one of --adapter RUN_DIR or --model MODEL_DIR")
    source = Path(adapter or model_dir)
    if not source.is_dir():
        raise FtkitError(f"{source}: no such directory")
    rundir.require_finished(source)
    meta = rundir.run_metadata(source)
    check_remote_code(meta, trust_remote_code)
    tokenizer = open_tokenizer(source)
    hardware = detect_hardware()
    torch_dtype = getattr(torch, inference_dtype(dtype, hardware))
    quant = quantization_for(meta, hardware.cuda, dtype, torch_dtype)
    if adapter is not None:
        model = load_adapter_model(Path(adapter), base, meta, tokenizer, torch_dtype, quant, trust_remote_code)
    else:
        if not (source / "config.json").is_file():
            hint = f"; for an adapter use --adapter {source}" if (source / "adapter_config.json").is_file() else ""
            raise FtkitError(f"{source}: no config.json, so not a model directory{hint}")
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch_dtype, trust_remote_code=trust_remote_code)
    if hardware.cuda and quant is None:
        model = model.to("cuda")
    model.eval()
    kwargs = {**(meta.get("chat_template_kwargs") or {}), **(template_kwargs or {})}
    return model, tokenizer, ChatFormat(tokenizer, tokenizer.chat_template, kwargs, f"the chat template of {source}")


def read_tools(path: Path | None) -> list[dict] | None:
    """--tools FILE: a JSON list of function schemas (OpenAI's {type: function, function: {...}} or bare)."""
    from ftkit.data.messages import BadRow, normalise_tools
    from ftkit.files import read_text

    if path is None:
        return None
    if Path(path).is_dir():
        raise FtkitError(f"--tools {path}: a directory; give a JSON file with a list of function schemas")
    if not Path(path).is_file():
        raise FtkitError(f"--tools {path}: no such file")
    try:
        tools = normalise_tools(read_text(Path(path), "JSON list of function schemas"), f"--tools {path}")
    except BadRow as err:
        raise FtkitError(str(err)) from None
    if not tools:
        raise FtkitError(f"--tools {path}: holds no function schemas; expected a JSON list of them")
    return tools


def parse_template_kwargs(text: str | None) -> dict | None:
    """--chat-template-kwargs '{"enable_thinking": false}'."""
    from ftkit.config.templates import template_kwargs_problem

    if text is None:
        return None
    try:
        kwargs = json.loads(text)
    except ValueError:
        raise FtkitError(f"--chat-template-kwargs {text!r}: not JSON; e.g. '{{\"enable_thinking\": false}}'") from None
    problem = template_kwargs_problem(kwargs)
    if problem:
        raise FtkitError(f"--chat-template-kwargs {problem}")
    return kwargs


def load_adapter_model(adapter: Path, base: str | None, meta: dict, tokenizer, torch_dtype, quant=None,
                       trust_remote_code: bool = False):
    """The base (resized to the run's embedding rows) with the adapter applied, as a PeftModel."""
    config_path = adapter / "adapter_config.json"
    if not config_path.is_file():
        raise FtkitError(f"{adapter}: no adapter_config.json; for a full fine-tune use --model {adapter}")
    try:
        base_name = base or json.loads(config_path.read_text(encoding="utf-8"))["base_model_name_or_path"]
    except (ValueError, KeyError, TypeError):
        raise FtkitError(f"{config_path}: not a readable adapter config (no base_model_name_or_path); "
                         "pass --base with the base model") from None
    from ftkit.hub import prepare_hub_access

    prepare_hub_access([base_name], log=lambda msg: print(msg, file=sys.stderr))
    model = run_base(adapter, base_name, meta, torch_dtype, trust_remote_code, quant)
    fit_rows(model, meta.get("embedding_rows") or len(tokenizer))
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter))


def run_base(adapter: Path, base_name: str, meta: dict, torch_dtype, trust: bool, quant=None):
    """The model a run's adapter applies to: the base, with the adapters of the runs it started from merged in, in
    order (`base_adapters` in ftkit_run.json: a preference run started from an SFT adapter). Such a base loads
    unquantised: folding an adapter into 4-bit weights would round the adapter's update away."""
    chain = meta.get("base_adapters") or []
    model = load_base(base_name, torch_dtype, trust, None if chain else quant)
    if chain:
        from peft import PeftModel

        home = rundir.run_file(adapter, rundir.DONE)
        for item in chain:
            folder = (home.parent if home else adapter) / item["path"]
            if not (folder / "adapter_config.json").is_file():
                raise FtkitError(f"{folder}: the adapter this run was trained on top of is missing; copy the run "
                                 "directory whole")
            fit_rows(model, item["embedding_rows"])
            model = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    return model


def fit_rows(model, rows: int) -> None:
    """Resize the embeddings to the rows a run was trained with (tokens it added)."""
    if rows and model.get_input_embeddings().weight.shape[0] != rows:
        model.resize_token_embeddings(rows, mean_resizing=False)


def merged_run(run_dir: Path, torch_dtype, trust: bool = False):
    """A finished adapter run as one plain model (base, earlier adapters and its own, merged): what a preference run
    starts from."""
    tokenizer = open_tokenizer(run_dir)
    meta = rundir.run_metadata(run_dir)
    return load_adapter_model(run_dir, None, meta, tokenizer, torch_dtype, None, trust).merge_and_unload()


def load_base(name: str, torch_dtype, trust: bool, quant=None):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, quantization_config=quant,
                                                    trust_remote_code=trust)
    except (OSError, ValueError) as err:
        raise FtkitError(f"base model '{name}' could not be loaded ({str(err).splitlines()[0][:200]}); "
                         "pass --base with a local path") from None


def quiet_loading() -> None:
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("peft").setLevel(logging.ERROR)
