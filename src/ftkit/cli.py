"""The `ftkit` command: thin wiring of the stages. Heavy libraries are imported inside commands only,
so `ftkit --help` and `ftkit validate` never import torch."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from ftkit.errors import FtkitError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Fine-tune causal language models from a YAML recipe (LoRA, QLoRA, full fine-tuning).",
    pretty_exceptions_enable=False,
)

_ARGS: list[str] = []  # this invocation's arguments, as main() received them
RecipeArg = typer.Argument(..., help="Path to a YAML recipe.", show_default=False)
SetOpt = typer.Option(None, "--set", help="Override a recipe key, e.g. --set learning_rate=2e-4 (repeatable).")


def _version(value: bool) -> None:
    if value:
        from ftkit.versions import version_line

        typer.echo(version_line())
        raise typer.Exit()


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
          version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the versions of ftkit, torch, transformers, trl and peft.")) -> None:
    """ftkit: recipe -> data -> model -> train -> artifacts; then chat with the result."""


def _debug_flag() -> bool:
    return "--debug" in _ARGS  # the root option, seen by main() before the command runs


def _print_notes(notes: list[str]) -> None:
    for note in notes:
        typer.echo(f"note: {note}", err=True)


@app.command()
def validate(recipe: Path = RecipeArg, set_: Optional[list[str]] = SetOpt) -> None:
    """Check a recipe (keys, types, values, local paths) without loading any weights or data."""
    from ftkit.config.recipe import load_recipe

    parsed = load_recipe(recipe, set_ or [])
    from ftkit.rundir import check_writable

    check_writable(parsed.output_dir(), "output_dir")  # as training checks it, before anything loads
    _print_notes(parsed.notes)
    m = parsed.model
    mode = "full fine-tune" if not m.use_peft else ("QLoRA 4-bit" if m.load_in_4bit else "LoRA 8-bit" if m.load_in_8bit else "LoRA")
    mode = mode if parsed.method == "sft" else f"{parsed.method}, {mode}"
    typer.echo(f"{recipe}: ok ({m.model_name_or_path}, {mode}, output_dir {parsed.output_dir()})")


@app.command()
def keys(
    pattern: Optional[str] = typer.Argument(None, help="A key (shown in full), part of one (lora), or a glob "
                                            "(bnb_4bit_*); default: every key.", show_default=False),
    json_: bool = typer.Option(False, "--json", help="Print the keys as JSON, for scripts."),
) -> None:
    """List the recipe keys: owner, type, default and help, from the tables validation uses."""
    import shutil

    from ftkit.commands.keys import run_keys

    width = shutil.get_terminal_size().columns if sys.stdout.isatty() else None
    run_keys(pattern, as_json=json_, width=width, echo=typer.echo)


@app.command()
def init(
    model: str = typer.Option(..., "--model", help="Base model: a local directory or a hub id."),
    data: str = typer.Option(..., "--data", help="Training data: a local file or folder (its format is detected), "
                             "or a hub dataset id."),
    output: Path = typer.Option(Path("recipe.yml"), "--output", "-o", help="The recipe to write (never replaced)."),
    gpu_memory: float = typer.Option(24, "--gpu-memory", help="GiB of the GPU you will train on: decides LoRA or "
                                     "QLoRA from ftkit estimate's figures."),
) -> None:
    """Write a commented starter recipe for a model and a data file (format detected, LoRA or QLoRA chosen)."""
    from ftkit.commands.init import run_init

    run_init(model, data, output, gpu_memory, echo=typer.echo)


@app.command()
def doctor(json_: bool = typer.Option(False, "--json", help="Print the findings as JSON, for scripts.")) -> None:
    """What this machine can train, and what to install to train more.

    Python, torch and its CUDA/ROCm build, GPUs (memory, bf16), bitsandbytes, flash-attn, liger-kernel, DeepSpeed,
    vLLM, whether the hub answers, cache sizes; then what that means for a recipe. Imports torch, nothing heavier."""
    from ftkit.commands.doctor import run_doctor

    run_doctor(as_json=json_, echo=typer.echo)


@app.command()
def preview(
    recipe: Path = RecipeArg,
    set_: Optional[list[str]] = SetOpt,
    n: int = typer.Option(3, "-n", "--samples", min=0, help="How many samples to render token by token."),
    json_: bool = typer.Option(False, "--json", help="Print only the statistics, as JSON, for scripts."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Re-tokenise the data instead of reusing the cache."),
) -> None:
    """Show what training will see (sources, lengths, masks), loading only the tokenizer and data."""
    from ftkit.config.recipe import load_recipe

    parsed = load_recipe(recipe, set_ or [])
    _print_notes(parsed.notes)
    from ftkit.commands.preview import run_preview

    run_preview(parsed, n, json_, use_cache=not no_cache)


@app.command()
def estimate(
    recipe: Path = RecipeArg,
    set_: Optional[list[str]] = SetOpt,
    json_: bool = typer.Option(False, "--json", help="Print the figures (bytes) as JSON, for scripts."),
) -> None:
    """Memory one training process needs on a GPU, from the model's config.json alone (no weights loaded, nothing heavy imported).

    The config comes from the local model directory, or from the hub (or its local cache). Parameters are
    counted tensor by tensor from the config. Weights at the training dtype (bf16 on a GPU unless the recipe
    says otherwise); 4-bit linears 0.5 byte + a float32 scale per 64 weights, 8-bit 1 byte, the rest in float32
    (as peft's k-bit preparation leaves it). Trainable: all weights, or LoRA A/B (+ DoRA magnitudes,
    + lora_modules_to_save copies) in float32 (bf16 on a 4-bit model trained in bf16). Gradients: one per
    trainable weight. Optimizer: AdamW 2 states per trainable weight at its dtype (float32 for bnb 32-bit,
    1 byte for 8-bit optimizers), Adafactor a row and column per matrix. Activations for
    per_device_train_batch_size x max_length tokens: what each layer keeps for backward (norms, q/k/v, RoPE,
    attention output, MLP intermediates, LoRA dropout copies) x layers, or with gradient checkpointing each
    layer's input + one layer, plus the logits in float32 with their log-softmax. A GPU fits when the total
    leaves 1 GiB for the CUDA context. Not counted: fragmentation, kernel scratch space, eval batches."""
    from ftkit.config.recipe import load_recipe

    parsed = load_recipe(recipe, set_ or [])
    _print_notes(parsed.notes)
    from ftkit.commands.estimate import run_estimate

    run_estimate(parsed, as_json=json_, echo=typer.echo)


@app.command()
def train(
    recipe: Path = RecipeArg,
    set_: Optional[list[str]] = SetOpt,
    resume: bool = typer.Option(False, "--resume", help="Continue the unfinished run in output_dir from its newest "
                                "complete checkpoint (the same as resume_from_checkpoint: true)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Re-tokenise the data instead of reusing the cache."),
    launcher: Optional[Path] = typer.Option(None, "--launcher", help="An accelerate config (accelerate_configs/): "
                                            "check the recipe once, then run it under `accelerate launch`."),
    num_processes: Optional[int] = typer.Option(None, "--num-processes", help="With --launcher: processes in all "
                                                "(GPUs per machine x machines); default: the config's."),
    machine_rank: Optional[int] = typer.Option(None, "--machine-rank", help="With --launcher on several machines: "
                                               "this machine's rank (0 on the main one); default: the config's."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Show only errors and the final summary "
                               "(output_dir/train.log still records everything)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show the libraries' own messages and progress "
                                 "bars too."),
) -> None:
    """Train a model as the recipe says and write the adapter (or model), tokenizer, model card and run summary.

    In a terminal a live display shows the phase, then step, loss, learning rate, speed, ETA and memory; otherwise
    one plain line per logging step (step 120/400 epoch 1.5 loss 0.532 lr 2.0e-4 ... eta 1m02s). Everything
    shown, and every library message, is also written to output_dir/train.log."""
    from ftkit.commands.train import run_train

    if quiet and verbose:
        raise FtkitError("--quiet and --verbose contradict each other; pass one of them")
    level = "quiet" if quiet else "verbose" if verbose else "normal"
    run_train(recipe, set_ or [], resume, no_cache, launcher, num_processes, machine_rank, level, _debug_flag(),
              show_notes=_print_notes, echo=lambda line: typer.echo(line, err=True))


AdapterOpt = typer.Option(None, "--adapter", help="A run's output_dir or any checkpoint-N dir inside it.")
ModelOpt = typer.Option(None, "--model", help="A full fine-tuned or merged model directory.")
BaseOpt = typer.Option(None, "--base", help="Base model to load the adapter on (default: from the adapter).")
DtypeOpt = typer.Option(None, "--dtype", help="auto, bfloat16, float16 or float32 (default: bf16 on GPU, float32 on "
                        "CPU; a 4-bit-trained adapter loads in 4-bit on GPU unless --dtype is given).")
TrustOpt = typer.Option(False, "--trust-remote-code", help="Run the model's own Python code from the hub (only for "
                        "models that need it; a run directory cannot turn this on by itself).")
# Generation options, declared once for chat, predict and serve (serve: the defaults requests may override).
MaxNewTokensOpt = typer.Option(256, "--max-new-tokens", help="Most tokens to generate per answer.")
TemperatureOpt = typer.Option(0.7, "--temperature", help="Sampling temperature (0 means greedy).")
TopPOpt = typer.Option(0.9, "--top-p", help="Nucleus sampling threshold.")
TopKOpt = typer.Option(50, "--top-k", help="Sample among the k most likely tokens (0: no limit).")
RepetitionOpt = typer.Option(1.0, "--repetition-penalty", help="Penalty > 1 discourages repeating tokens.")
NoRepeatOpt = typer.Option(0, "--no-repeat-ngram-size", help="Never repeat an n-gram of this size (0: off).")
SeedOpt = typer.Option(None, "--seed", help="Random seed for sampling.")
TemplateKwargsOpt = typer.Option(None, "--chat-template-kwargs", help="Chat template variables as JSON, e.g. "
                                 "'{\"enable_thinking\": false}', added over those the run was trained with.")


def greedy_option(default: bool):
    """--greedy/--sample: one flag pair; chat samples by default, predict decodes greedily."""
    return typer.Option(default, "--greedy/--sample", help="Always pick the most likely token (reproducible), "
                        "or sample with the temperature/top-p/top-k given.")


def _generation_options(max_new_tokens, temperature, top_p, top_k, repetition_penalty, no_repeat_ngram_size, greedy,
                        seed):
    from ftkit.inference.options import GenerationOptions

    options = GenerationOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                                greedy=greedy, seed=seed)
    options.check()
    return options


@app.command()
def chat(
    adapter: Optional[Path] = AdapterOpt,
    model: Optional[Path] = ModelOpt,
    base: Optional[str] = BaseOpt,
    prompt: Optional[str] = typer.Option(None, help="Ask one question, print only the answer, exit."),
    system: Optional[str] = typer.Option(None, help="System prompt (default: the one the run was trained with; "
                                         "--system '' for none)."),
    max_new_tokens: int = MaxNewTokensOpt,
    temperature: float = TemperatureOpt,
    top_p: float = TopPOpt,
    top_k: int = TopKOpt,
    repetition_penalty: float = RepetitionOpt,
    no_repeat_ngram_size: int = NoRepeatOpt,
    greedy: bool = greedy_option(False),
    seed: Optional[int] = SeedOpt,
    dtype: Optional[str] = DtypeOpt,
    trust_remote_code: bool = TrustOpt,
    stream: bool = typer.Option(True, help="Print tokens as they are generated."),
    tools: Optional[Path] = typer.Option(None, "--tools", help="A JSON file with a list of function schemas for "
                                         "the chat template; answer the model's tool calls with /tool RESULT."),
    chat_template_kwargs: Optional[str] = TemplateKwargsOpt,
) -> None:
    """Talk to a trained model with the exact chat template it was trained with.

    REPL commands: /reset, /system TEXT, /set NAME=VALUE (e.g. /set temperature=0.5), /params, /exit.
    With stdin piped, each line is one turn (commands work too); --prompt answers once."""
    from ftkit.commands.chat import run_chat

    options = _generation_options(max_new_tokens, temperature, top_p, top_k, repetition_penalty, no_repeat_ngram_size,
                                  greedy, seed)
    run_chat(adapter=adapter, model_dir=model, base=base, prompt=prompt, system=system, options=options, dtype=dtype,
             stream=stream, trust_remote_code=trust_remote_code, tools_path=tools,
             template_kwargs=chat_template_kwargs)


@app.command()
def predict(
    input_: Path = typer.Option(..., "--input", help="Rows to answer, in any format ftkit trains on."),
    output: Path = typer.Option(..., "--output", help="JSON lines out (a new file, or one ftkit predict wrote: "
                                "rerun with the same file to resume)."),
    adapter: Optional[Path] = AdapterOpt,
    model: Optional[Path] = ModelOpt,
    base: Optional[str] = BaseOpt,
    system: Optional[str] = typer.Option(None, help="System prompt for rows that have none (default: the one the "
                                         "run was trained with; --system '' for none)."),
    batch_size: int = typer.Option(8, help="Rows generated together (left-padded)."),
    max_new_tokens: int = MaxNewTokensOpt,
    temperature: float = TemperatureOpt,
    top_p: float = TopPOpt,
    top_k: int = TopKOpt,
    repetition_penalty: float = RepetitionOpt,
    no_repeat_ngram_size: int = NoRepeatOpt,
    greedy: bool = greedy_option(True),
    seed: Optional[int] = SeedOpt,
    dtype: Optional[str] = DtypeOpt,
    trust_remote_code: bool = TrustOpt,
    chat_template_kwargs: Optional[str] = TemplateKwargsOpt,
    json_: bool = typer.Option(False, "--json", help="Print the metrics file as JSON (other lines go to stderr)."),
) -> None:
    """Answer every row of a file (greedy by default); score against the rows' answers when they have them.

    Rows may carry `tools` (function schemas) and `chat_template_kwargs` columns, and tool calls and results in
    their history; a row ending with a tool result is answered after it. The scores go to
    OUTPUT_STEM.metrics.json beside the predictions (--json prints them)."""
    from ftkit.commands.predict import metrics_path, run_predict

    options = _generation_options(max_new_tokens, temperature, top_p, top_k, repetition_penalty, no_repeat_ngram_size,
                                  greedy, seed)
    run_predict(adapter, model, base, input_, output, options, batch_size=batch_size, system=system, dtype=dtype,
                trust_remote_code=trust_remote_code, template_kwargs=chat_template_kwargs,
                log=(lambda line: typer.echo(line, err=True)) if json_ else print)
    if json_:
        typer.echo(metrics_path(output).read_text(encoding="utf-8").rstrip())


@app.command()
def merge(
    adapter: Path = typer.Option(..., "--adapter", help="A run's output_dir or any checkpoint-N dir inside it."),
    output: Path = typer.Option(..., "--output", help="Directory for the merged model."),
    base: Optional[str] = BaseOpt,
    dtype: Optional[str] = typer.Option(None, help="bfloat16, float16 or float32 (default: the base's own dtype)."),
    max_shard_size: str = typer.Option("5GB", help="Largest safetensors shard."),
    overwrite: bool = typer.Option(False, help="Replace an earlier merge output of ftkit's in --output."),
    trust_remote_code: bool = TrustOpt,
) -> None:
    """Merge a LoRA/DoRA adapter into its (unquantised) base: a standalone model for chat, transformers, vLLM."""
    from ftkit.commands.merge import run_merge

    run_merge(adapter, output, base=base, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite,
              trust_remote_code=trust_remote_code)


@app.command()
def serve(
    adapter: Optional[Path] = AdapterOpt,
    model: Optional[Path] = ModelOpt,
    base: Optional[str] = BaseOpt,
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8000, help="Port to listen on (0: any free port)."),
    queue_size: int = typer.Option(8, help="Requests that may wait for the model; more get 503."),
    name: Optional[str] = typer.Option(None, help="Model id clients see (default: the directory name)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="FTKIT_API_KEY", show_envvar=True,
                                          help="Require 'Authorization: Bearer KEY' on /v1 (401 without)."),
    max_new_tokens: int = MaxNewTokensOpt,
    temperature: float = TemperatureOpt,
    top_p: float = TopPOpt,
    top_k: int = TopKOpt,
    repetition_penalty: float = RepetitionOpt,
    no_repeat_ngram_size: int = NoRepeatOpt,
    dtype: Optional[str] = DtypeOpt,
    trust_remote_code: bool = TrustOpt,
    chat_template_kwargs: Optional[str] = TemplateKwargsOpt,
) -> None:
    """OpenAI-compatible HTTP server (FastAPI + uvicorn): /v1/chat/completions, /v1/completions, /v1/models, /health.

    A chat request's `tools` go to the chat template, and tool calls the model writes in the template's syntax
    (Qwen's <tool_call> blocks, Llama-3.1's JSON) come back as `tool_calls`; a request may add
    `chat_template_kwargs`."""
    from ftkit.commands.serve import run_serve

    options = _generation_options(max_new_tokens, temperature, top_p, top_k, repetition_penalty, no_repeat_ngram_size,
                                  False, None)
    run_serve(adapter, model, base, options, host=host, port=port, queue_size=queue_size, name=name, dtype=dtype,
              trust_remote_code=trust_remote_code, api_key=api_key or None, template_kwargs=chat_template_kwargs)


def quiet_libraries(debug: bool) -> None:
    """Library deprecation chatter and optional-kernel notices are not actionable by our users."""
    import logging
    import warnings

    if not debug:
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*use_cache=True.*")
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> None:
    """Run one command; every outcome leaves as an exit status: 0, 2 (the user's input), 130 (interrupted),
    1 (a bug or a library failure: one line, --debug for the traceback)."""
    import importlib
    import traceback

    # typer raises its own bundled copy of click's exceptions; find them through a public name
    click_errors = importlib.import_module(typer.BadParameter.__module__)
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    _ARGS[:] = args
    quiet_libraries(debug)
    try:
        code = app(args=args, prog_name="ftkit", standalone_mode=False)
    except FtkitError as err:
        if debug:
            traceback.print_exc()
        from ftkit.dist import is_main_process

        if is_main_process():  # every worker meets the same problem: rank 0 alone reports it
            for line in err.lines:
                typer.echo(f"ftkit: {err.label}: {line}", err=True)
        sys.exit(err.exit_code)
    except click_errors.ClickException as err:
        err.show()
        sys.exit(2 if isinstance(err, click_errors.UsageError) else err.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        code = 130
    except typer.Exit as err:
        code = err.exit_code
    except Exception as err:  # a bug or a library failure we did not anticipate: one line, not a wall
        if debug:
            traceback.print_exc()
        typer.echo(f"ftkit: internal error: {type(err).__name__}: {err} (rerun with --debug for the traceback)", err=True)
        sys.exit(1)
    if code == 130:  # typer turns Ctrl-C into this value when it is not standalone
        typer.echo("ftkit: interrupted", err=True)
    sys.exit(code if isinstance(code, int) else 0)
