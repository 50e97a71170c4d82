"""The trainer's arguments: TRL's SFTConfig from the recipe, reporting set up, secrets kept out of files.

transformers pickles the whole SFTConfig into training_args.bin in the run and every checkpoint, so a
secret passed as an argument would be written to disk: hub_token goes to the environment instead
(huggingface_hub reads HF_TOKEN), where nothing ftkit writes can reach it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ftkit.config.schema import HANDLED_SFT_KEYS, SECRET_PATTERN, Recipe
from ftkit.errors import FtkitError
from ftkit.train import options as train_options

# SFTConfig values ftkit uses where the recipe says nothing (`ftkit keys` shows them as the defaults).
# logging_nan_inf_filter: transformers replaces NaN/inf losses in the logs by the window's average (0 when all
# are bad), hiding exactly what NonFiniteLossGuard must see; ftkit stops on them instead.
SFT_DEFAULTS = {"report_to": "none", "logging_nan_inf_filter": False}


def setup_reporting(recipe: Recipe, out: Path, log=print) -> None:
    """wandb without an API key would block on a login prompt: run it offline and say so. Its files go
    into output_dir rather than the user's working directory."""
    report = recipe.sft.get("report_to") or []
    report = [report] if isinstance(report, str) else report
    if "wandb" in report or "all" in report:
        os.environ.setdefault("WANDB_DIR", str(out))
    for key, env in (("wandb_entity", "WANDB_ENTITY"), ("wandb_project", "WANDB_PROJECT"),
                     ("wandb_run_group", "WANDB_RUN_GROUP")):
        if getattr(recipe.run, key):
            os.environ[env] = getattr(recipe.run, key)
    if ("wandb" in report or "all" in report) and not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
        if not (Path.home() / ".netrc").is_file():
            os.environ["WANDB_MODE"] = "offline"
            log(f"note: no wandb API key found; wandb logs offline to {out}/wandb (upload later with `wandb sync`)")


def move_secrets_to_environment(args: dict) -> None:
    """hub_token (and any other secret-named argument) leaves the arguments; the hub token becomes HF_TOKEN."""
    for key in [k for k in args if SECRET_PATTERN.search(k)]:
        value = args.pop(key)
        if key == "hub_token" and value:
            os.environ["HF_TOKEN"] = str(value)


def checkpointing_name(config_class) -> str:
    """transformers 5.23 renamed gradient_checkpointing* to activation_checkpointing*; the installed one decides."""
    names = {field.name for field in dataclasses.fields(config_class)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def set_checkpointing(args: dict, enabled: bool, name: str) -> None:
    """Recipes use either name; `args` gets the installed library's name only, kwargs defaulting to non-reentrant."""
    kwargs = args.pop("activation_checkpointing_kwargs", None) or args.pop("gradient_checkpointing_kwargs", None)
    for key in ("activation_checkpointing", "gradient_checkpointing", "gradient_checkpointing_kwargs"):
        args.pop(key, None)
    args[name] = enabled
    if enabled:
        args[f"{name}_kwargs"] = kwargs or {"use_reentrant": False}


def sft_config(recipe: Recipe, precision, out: Path, has_eval: bool, config_class=None, method_args=None):
    """The trainer's config: SFTConfig, or the preference method's `config_class` with `method_args` applied."""
    from trl import SFTConfig

    config_class = config_class or SFTConfig

    args = {k: v for k, v in recipe.sft.items() if k not in HANDLED_SFT_KEYS}
    args.pop("resume_from_checkpoint", None)
    move_secrets_to_environment(args)
    args.update(output_dir=str(out), bf16=precision.bf16, fp16=precision.fp16,
                use_cpu=precision.device == "cpu", include_num_input_tokens_seen="all",
                trust_remote_code=recipe.model.trust_remote_code)
    if not has_eval and args.get("eval_strategy", "no") != "no":
        raise FtkitError("eval_strategy is set but there is no eval split: add a test split to dataset_splits "
                         "or set test_split_size")
    if method_args is not None:
        args = method_args(args)
    set_checkpointing(args, recipe.checkpointing(), checkpointing_name(config_class))
    if args.get("padding_free") and not args.get("packing"):
        args["max_length"] = None  # TRL refuses padding_free with a max_length it cannot enforce; ftkit's data did
    for key, value in SFT_DEFAULTS.items():
        args.setdefault(key, value)
    args = train_options.apply(recipe, args)  # early stopping: load_best_model_at_end, checkpoints per evaluation
    try:
        return config_class(**args)
    except (ValueError, TypeError) as err:
        raise FtkitError(f"training arguments rejected: {str(err).splitlines()[0]}") from None
