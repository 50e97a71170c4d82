"""ftkit's defaults where they differ from TRL's, chosen by measurement (bench/RESULTS.md) and decided once the
model and the device are known. A recipe that sets the key always wins; the decision is written back into the
recipe, so ftkit_recipe.yml and the run's notes say what was used.

- Gradient checkpointing (TRL: always on): on only where the run would not fit without it, by `ftkit estimate`'s
  model against this GPU's memory; off on a CPU, where it cost 7-17% of the step and saved little memory.
- padding_free (TRL: off): on when the batch holds more than one sample and this model keeps packed samples apart
  (the same probe that guards an explicit padding_free). It trains on exactly the padded batches' samples and
  gradients (tests/test_packing.py) without the padding: 2.15x the tokens/s on a CPU, 40% less peak memory on an
  H200.
"""

from __future__ import annotations

from ftkit.config.checks import packing_attention_ok
from ftkit.config.precision import Precision
from ftkit.errors import FtkitError

# What `ftkit keys` shows as the default of the keys this module decides.
CHECKPOINTING = "on only where the run would not fit this GPU without it; off on a CPU"
DESCRIBED = {"gradient_checkpointing": CHECKPOINTING, "activation_checkpointing": CHECKPOINTING,
             "padding_free": "on where the batch holds several samples and the model keeps packed samples apart"}


def resolve_checkpointing(model, recipe, precision: Precision, device_index: int, log=print) -> bool:
    """The recipe's gradient checkpointing, or ftkit's choice written into recipe.sft; -> the value used."""
    chosen = recipe.checkpointing()
    if chosen is not None:
        return chosen
    if precision.device != "cuda":
        decision, why = False, "a CPU run: it would slow each step and save little memory"
    else:
        decision, why = checkpointing_for_gpu(model, recipe, precision, device_index)
    recipe.sft["gradient_checkpointing"] = decision
    log(f"note: gradient checkpointing {'on' if decision else 'off'} ({why}; set gradient_checkpointing to choose)")
    return decision


def checkpointing_for_gpu(model, recipe, precision: Precision, device_index: int) -> tuple[bool, str]:
    import torch

    from ftkit.config.memory import GIB, checkpointing_needed, estimate, setup_from_recipe
    from ftkit.config.precision import Hardware

    total = torch.cuda.get_device_properties(device_index).total_memory
    hardware = Hardware(cuda=True, bf16=precision.bf16 or torch.cuda.is_bf16_supported())
    try:
        result = estimate(model.config.to_dict(), setup_from_recipe(recipe, hardware))
    except FtkitError:  # an architecture the estimate cannot read: TRL's default, the safe side
        return True, "ftkit cannot estimate this architecture's memory"
    need = result["bytes"]["total_no_checkpointing"] / GIB
    if checkpointing_needed(result, total):
        return True, f"estimated {need:.1f} GiB without it, more than this GPU's {total / GIB:.0f} GiB allows"
    return False, f"estimated {need:.1f} GiB without it fits this GPU's {total / GIB:.0f} GiB"


def padding_free_by_default(recipe) -> bool:
    """Whether ftkit would turn padding_free on for this recipe, before probing the model."""
    s = recipe.sft
    batch = s.get("per_device_train_batch_size") or recipe.sft_value("per_device_train_batch_size")
    return ("padding_free" not in s and not s.get("packing") and batch > 1
            and packing_attention_ok(recipe.model.attn_implementation))


def choose_padding_free(model, recipe, log=print) -> bool:
    """ftkit's padding_free default, on only after the probe shows this model keeps packed samples apart."""
    if not padding_free_by_default(recipe):
        return bool(recipe.sft.get("padding_free"))
    from ftkit.config.launch_plan import plan_from_environment
    from ftkit.train.packing import leaks_across_samples

    leaks = None if plan_from_environment().shards_parameters else leaks_across_samples(model)
    if leaks is not False:  # leaks, or sharded weights that cannot be probed: padded batches as TRL would
        return False
    recipe.sft["padding_free"] = True
    log("note: padding_free on (batches without padding, the same samples and gradients; set padding_free: false "
        "for padded batches)")
    return True
