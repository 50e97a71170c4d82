"""Chat stage: load a run's adapter (or a full or merged model) with the exact template and stop tokens it
was trained with, and answer: one-shot (--prompt), line by line from piped stdin, or an interactive REPL
with streamed tokens and slash commands. predict and serve generate through the same functions."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ftkit.errors import FtkitError


@dataclass
class GenerationOptions:
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    greedy: bool = False
    seed: int | None = None

    def set(self, assignment: str) -> None:
        """`/set temperature=0.5`: one field, parsed to its type; raises FtkitError on a bad name or value."""
        name, sep, raw = assignment.partition("=")
        name, raw = name.strip().replace("-", "_"), raw.strip()
        kinds = {f.name: f.type for f in fields(self)}
        if not sep or name not in kinds:
            raise FtkitError(f"usage: /set NAME=VALUE with NAME one of {', '.join(kinds)}")
        kind = kinds[name]
        try:
            if raw.lower() in ("none", "null", "") and "None" in str(kind):
                value = None
            elif "bool" in str(kind):
                if raw.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ValueError(raw)
                value = raw.lower() in ("true", "1", "yes", "on")
            elif "int" in str(kind):
                value = int(raw)
            else:
                value = float(raw)
        except ValueError:
            raise FtkitError(f"{name}: '{raw}' is not a valid {str(kind).split(' ')[0]}") from None
        setattr(self, name, value)
        self.check()

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise FtkitError("max_new_tokens must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.repetition_penalty <= 0 \
                or self.no_repeat_ngram_size < 0:
            raise FtkitError("need temperature >= 0, 0 < top_p <= 1, top_k >= 0, repetition_penalty > 0, "
                             "no_repeat_ngram_size >= 0")

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in asdict(self).items())


def run_metadata(directory: Path) -> dict:
    """ftkit_run.json of a run dir, or of the run a checkpoint-N dir belongs to."""
    path = run_file(directory, "ftkit_run.json")
    return json.loads(path.read_text(encoding="utf-8")) if path else {}


def run_file(directory: Path, name: str) -> Path | None:
    """A file of the run: in the dir itself, or in the run dir a checkpoint-N dir belongs to."""
    for folder in (directory, directory.parent):
        if (folder / name).is_file():
            return folder / name
    return None


def default_system(directory: Path, system: str | None) -> str | None:
    """--system if given ("" for none), else the system prompt the run was trained with."""
    if system is not None:
        return system or None
    return run_metadata(directory).get("system_prompt")


def tokenizer_dir(directory: Path) -> Path:
    for folder in (directory, directory.parent):
        if (folder / "tokenizer_config.json").is_file():
            return folder
    raise FtkitError(f"{directory}: no tokenizer saved here or in its parent run directory")


def resolve_dtype(dtype: str | None, cuda: bool):
    """--dtype, else bf16 on a GPU that has it, else float32 (always float32 on CPU)."""
    import torch

    if dtype and dtype != "auto":
        if dtype not in ("bfloat16", "float16", "float32"):
            raise FtkitError(f"--dtype {dtype}: expected auto, bfloat16, float16 or float32")
        return getattr(torch, dtype)
    return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32


def quantization_for(meta: dict, cuda: bool, dtype: str | None, torch_dtype):
    """A 4-bit (8-bit) trained adapter loads in 4-bit (8-bit) on a GPU unless --dtype names a precision;
    on CPU, or with --dtype, the base loads unquantised."""
    if not cuda or (dtype and dtype != "auto"):
        return None
    from transformers import BitsAndBytesConfig

    if meta.get("load_in_4bit"):
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch_dtype, bnb_4bit_quant_type="nf4")
    if meta.get("load_in_8bit"):
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def open_tokenizer(source: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir(source)))
    if not tokenizer.chat_template:
        raise FtkitError(f"{source}: the tokenizer has no chat template; was this trained with ftkit?")
    return tokenizer


def load_for_chat(adapter: Path | None, model_dir: Path | None, base: str | None, dtype: str | None):
    """-> (model, tokenizer, ChatFormat)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ftkit.data.chat_format import ChatFormat

    if (adapter is None) == (model_dir is None):
        raise FtkitError("give exactly one of --adapter RUN_DIR or --model MODEL_DIR")
    source = Path(adapter or model_dir)
    if not source.is_dir():
        raise FtkitError(f"{source}: no such directory")
    meta = run_metadata(source)
    tokenizer = open_tokenizer(source)
    cuda = torch.cuda.is_available()
    torch_dtype = resolve_dtype(dtype, cuda)
    quant = quantization_for(meta, cuda, dtype, torch_dtype)
    if adapter is not None:
        model = load_adapter_model(Path(adapter), base, meta, tokenizer, torch_dtype, quant)
    else:
        if not (source / "config.json").is_file():
            hint = f"; for an adapter use --adapter {source}" if (source / "adapter_config.json").is_file() else ""
            raise FtkitError(f"{source}: no config.json, so not a model directory{hint}")
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch_dtype,
                                                     trust_remote_code=bool(meta.get("trust_remote_code")))
    if cuda and quant is None:
        model = model.to("cuda")
    model.eval()
    return model, tokenizer, ChatFormat(tokenizer, tokenizer.chat_template)


def load_adapter_model(adapter: Path, base: str | None, meta: dict, tokenizer, torch_dtype, quant=None):
    """The base (resized to the run's embedding rows) with the adapter applied, as a PeftModel."""
    config_path = adapter / "adapter_config.json"
    if not config_path.is_file():
        raise FtkitError(f"{adapter}: no adapter_config.json; for a full fine-tune use --model {adapter}")
    base_name = base or json.loads(config_path.read_text())["base_model_name_or_path"]
    from ftkit.hub import prepare_hub_access

    prepare_hub_access([base_name], log=lambda msg: print(msg, file=sys.stderr))
    model = load_base(base_name, torch_dtype, bool(meta.get("trust_remote_code")), quant)
    rows = meta.get("embedding_rows") or len(tokenizer)
    if model.get_input_embeddings().weight.shape[0] != rows:
        model.resize_token_embeddings(rows, mean_resizing=False)
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter))


def load_base(name: str, torch_dtype, trust: bool, quant=None):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, quantization_config=quant,
                                                    trust_remote_code=trust)
    except (OSError, ValueError) as err:
        raise FtkitError(f"base model '{name}' could not be loaded ({str(err).splitlines()[0][:200]}); "
                         "pass --base with a local path") from None


def stop_ids(chat_format) -> list[int]:
    tokenizer = chat_format.tokenizer
    return [tokenizer.convert_tokens_to_ids(s) for s in chat_format.stop_strings()]


def generation_kwargs(chat_format, options: GenerationOptions) -> dict:
    """model.generate() arguments: stop at the template's end-of-turn (and eos); temperature 0 is greedy."""
    stops = stop_ids(chat_format)
    pad = chat_format.tokenizer.pad_token_id
    greedy = options.greedy or options.temperature <= 0
    kwargs = dict(max_new_tokens=options.max_new_tokens, do_sample=not greedy, eos_token_id=stops,
                  pad_token_id=pad if pad is not None else stops[0], repetition_penalty=options.repetition_penalty)
    if options.no_repeat_ngram_size:
        kwargs["no_repeat_ngram_size"] = options.no_repeat_ngram_size
    if greedy:  # override sampling values a generation_config may carry, so transformers does not warn
        kwargs.update(temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(temperature=options.temperature, top_p=options.top_p, top_k=options.top_k)
    return kwargs


def generate_ids(model, chat_format, messages: list[dict], options: GenerationOptions, streamer=None,
                 stopping_criteria=None) -> tuple[int, list[int]]:
    """-> (prompt token count, generated token ids including the stop token if one was reached)."""
    import torch

    tokenizer = chat_format.tokenizer
    prompt = chat_format.prompt(messages)
    inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(model.device)
    if options.seed is not None:
        torch.manual_seed(options.seed)
    with torch.no_grad():
        output = model.generate(**inputs, streamer=streamer, stopping_criteria=stopping_criteria,
                                **generation_kwargs(chat_format, options))
    start = inputs["input_ids"].shape[1]
    return start, output[0, start:].tolist()


def generate(model, chat_format, messages: list[dict], options: GenerationOptions, streamer=None) -> str:
    _, ids = generate_ids(model, chat_format, messages, options, streamer)
    return chat_format.tokenizer.decode(ids, skip_special_tokens=True)


def generate_batch(model, chat_format, conversations: list[list[dict]], options: GenerationOptions) -> list[str]:
    """Answers for many conversations in one left-padded batch; same prompts and stops as generate()."""
    import torch

    tokenizer = chat_format.tokenizer
    prompts = [chat_format.prompt(messages) for messages in conversations]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the last position of every row
    try:
        kwargs = generation_kwargs(chat_format, options)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token_id = kwargs["pad_token_id"]
        inputs = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt").to(model.device)
    finally:
        tokenizer.padding_side = side
    if options.seed is not None:
        torch.manual_seed(options.seed)
    with torch.no_grad():
        output = model.generate(**inputs, **kwargs)
    start = inputs["input_ids"].shape[1]
    return [tokenizer.decode(row[start:], skip_special_tokens=True) for row in output.tolist()]


def char_streamer(tokenizer, on_text):
    """A transformers TextStreamer that hands `on_text` each newly decoded piece as soon as it forms whole
    characters (a byte-level token that ends mid-character is held back), not whole words."""
    from transformers import TextStreamer

    class CharStreamer(TextStreamer):
        def put(self, value):
            if len(value.shape) > 1:
                value = value[0]
            if self.skip_prompt and self.next_tokens_are_prompt:
                self.next_tokens_are_prompt = False
                return
            self.token_cache.extend(value.tolist())
            text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs).rstrip("\ufffd")
            if len(text) > self.print_len:
                self.on_finalized_text(text[self.print_len:])
                self.print_len = len(text)

        def on_finalized_text(self, text: str, stream_end: bool = False):
            if text:
                on_text(text)

    return CharStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


HELP = ("commands: /reset (clear the history), /system TEXT (new system prompt; /system alone removes it), "
        "/set NAME=VALUE (e.g. /set temperature=0.5), /params, /help, /exit")


def run_chat(adapter, model_dir, base, prompt, system, options: GenerationOptions, dtype=None,
             stream: bool = True) -> None:
    quiet_loading()
    options.check()
    model, _, chat_format = load_for_chat(adapter, model_dir, base, dtype)
    system = default_system(adapter or model_dir, system)
    if prompt is not None:
        answer(model, chat_format, ([{"role": "system", "content": system}] if system else [])
               + [{"role": "user", "content": prompt}], options, stream)
        return
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"ftkit chat: type a message. {HELP}", file=sys.stderr)
    history: list[dict] = []
    for line in iter_input(interactive):
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            if command in ("/exit", "/quit"):
                break
            if command == "/reset":
                history = []
                note("history cleared")
            elif command == "/system":
                system = rest.strip() or None
                history = []
                note(f"system prompt {'set' if system else 'removed'}; history cleared")
            elif command == "/set":
                try:
                    options.set(rest)
                    note(options.describe())
                except FtkitError as err:
                    note(str(err))
            elif command == "/params":
                note(options.describe() + (f"\nsystem: {system}" if system else ""))
            elif command == "/help":
                note(HELP)
            else:
                note(f"unknown command {command}; {HELP}")
            continue
        messages = ([{"role": "system", "content": system}] if system else []) + history
        try:
            text = answer(model, chat_format, messages + [{"role": "user", "content": line}], options, stream)
        except KeyboardInterrupt:
            if not interactive:
                raise
            print(flush=True)
            note("(answer interrupted; that turn is not kept)")
            continue
        history += [{"role": "user", "content": line}, {"role": "assistant", "content": text}]


def answer(model, chat_format, messages, options, stream: bool) -> str:
    """Print the answer (streamed as it is generated) and a newline; return it."""
    if not stream:
        text = generate(model, chat_format, messages, options)
        print(text, flush=True)
        return text
    streamer = char_streamer(chat_format.tokenizer, lambda piece: print(piece, end="", flush=True))
    text = generate(model, chat_format, messages, options, streamer=streamer)
    print(flush=True)
    return text


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def quiet_loading() -> None:
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("peft").setLevel(logging.ERROR)


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
