"""`ftkit estimate`: GPU memory one training process needs, from the model's config.json alone (no weights, no
torch), so it answers in a second before anyone rents a GPU.

Method (also in `ftkit estimate --help`):
- Parameters are counted from the config, tensor by tensor, for decoder-only layouts (Llama, Mistral, Qwen2/3,
  Gemma 1-3, Phi-3, Baichuan, GPT-NeoX/Pythia); a test checks the count exactly against transformers' models.
- Weights: at the training dtype (ftkit's rule: bf16 on a GPU unless the recipe says otherwise). 4-bit
  (bitsandbytes) linear layers take 0.5 byte per weight plus a float32 scale per 64 weights (an 8-bit scale with
  use_bnb_nested_quant); 8-bit ones 1 byte plus a float32 scale per output row. peft's
  prepare_model_for_kbit_training casts everything that is not quantised (embeddings, lm_head, norms) to float32.
- Trainable parameters: every weight (full fine-tune), or LoRA A/B of the targeted linear layers (+ DoRA's
  magnitude vector, + full copies of lora_modules_to_save). peft keeps LoRA weights in float32; on a quantised
  model they follow the 4-bit compute dtype (bf16 when training in bf16). Gradients: one per trainable weight,
  same dtype.
- Optimizer states per trainable weight: AdamW 2 states at the weight's dtype (torch) or in float32 (bnb 32-bit),
  1 byte each for 8-bit optimizers, Adafactor a row and a column per matrix, SGD none, and so on.
- Activations for per_device_train_batch_size x max_length tokens (the longest possible batch): what autograd
  keeps per decoder layer with sdpa/flash attention (norm inputs/outputs, q/k/v before and after RoPE, attention
  output, the MLP's intermediate tensors, LoRA dropout copies), times the layers; with gradient checkpointing
  only each layer's input plus one layer recomputed. Plus the logits, their float32 copy and log-softmax.
- Total: weights + trainable copies + gradients + optimizer states + activations (with the recipe's
  checkpointing setting). A GPU "fits" when the total leaves 1 GiB for the CUDA context and kernels.
- Preference methods: DPO, ORPO and SimPO run chosen and rejected answers in one forward (twice the activations);
  DPO and KTO under full fine-tuning keep a frozen reference copy of the weights (none with LoRA: the reference is
  the adapter switched off; none with precompute_ref_log_probs), whose forward runs without gradients.
Not counted: allocator fragmentation, temporary buffers of single kernels, eval batches, and tokens ftkit adds
to the vocabulary at train time.
"""

from __future__ import annotations

import json

from ftkit.config.memory import CUDA_CONTEXT_GIB, GIB, Setup, estimate, setup_from_recipe
from ftkit.errors import FtkitError
from ftkit.hub import read_model_config


def gib(n: float) -> str:
    return f"{n / GIB:,.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:,.1f} MiB"


def render(result: dict, setup: Setup, source: str, model: str) -> str:
    b, lab = result["bytes"], result["labels"]
    mode = ("full fine-tune" if not setup.use_peft else
            ("QLoRA 4-bit" if setup.quant == "4bit" else "LoRA 8-bit" if setup.quant == "8bit" else "LoRA")
            + (" (DoRA)" if setup.use_dora else "") + f" r={setup.lora_r}")
    lines = [
        f"model {model}: {result['model_type']}, {result['parameters']:,} parameters, {result['layers']} layers, "
        f"hidden {result['hidden_size']}, vocab {result['vocab_size']:,} (config: {source})",
        f"{mode}; {setup.batch} x {setup.max_length:,} tokens per device"
        + (" x 2 sequences (chosen and rejected, one forward)" if setup.sequences == 2 else "")
        + f"; optimizer {setup.optim}; "
        "gradient checkpointing " + ({True: "on", False: "off"}.get(setup.checkpointing)
                                     or "auto (ftkit turns it on only where the run would not fit without it)"),
        "",
        f"{'component':<54}{'parameters':>16}{'memory':>12}",
    ]

    def row(name, params, mem, extra=""):
        lines.append(f"{name:<54}{params:>16}{mem:>12}{extra}")

    row(f"weights ({lab['weights']})", f"{result['parameters']:,}", gib(b["weights"]))
    if setup.reference != "none":
        what = {"copy": "a frozen copy", "adapter off": "the weights with the adapter off",
                "precomputed": "log-probs precomputed before training"}[setup.reference]
        row(f"reference model ({what})", "", gib(b["reference_model"]))
    if setup.use_peft:
        row(f"trainable parameters ({lab['trainable']})", f"{result['trainable_parameters']:,}",
            gib(b["trainable_copies"]))
    else:
        row("trainable parameters (the weights)", f"{result['trainable_parameters']:,}", "-")
    row("gradients", "", gib(b["gradients"]))
    row("optimizer states", "", gib(b["optimizer_states"]), f"  {lab['optimizer']}")
    on, off = b["activations_checkpointing"], b["activations_no_checkpointing"]
    row(f"activations, gradient checkpointing on ({lab['activations']})", "", gib(on),
        "  (not in total)" if setup.checkpointing is False else "")
    row("activations, gradient checkpointing off", "", gib(off),
        "" if setup.checkpointing is False else "  (not in total)")
    row("total, one training process", "", gib(b["total"]))
    lines.append("")
    fits_line = "; ".join(f"{name}: {'yes' if ok else 'no'}" for name, ok in result["fits"].items())
    lines.append(f"fits on: {fits_line}  (leaving {CUDA_CONTEXT_GIB:g} GiB for the CUDA context"
                 + (", with gradient checkpointing where needed)" if setup.checkpointing is None else ")"))
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


def run_estimate(recipe, as_json: bool = False, echo=print) -> dict:
    config, source = read_model_config(recipe.model.model_name_or_path, recipe.model.model_revision)
    setup = setup_from_recipe(recipe)
    try:
        result = estimate(config, setup)
    except FtkitError as err:  # name the config.json the problem is in
        raise FtkitError(*(line.replace("config.json", source, 1) for line in err.lines)) from None
    if as_json:
        echo(json.dumps({**result, "config": source}, indent=2))
    else:
        echo(render(result, setup, source, recipe.model.model_name_or_path))
    return result
