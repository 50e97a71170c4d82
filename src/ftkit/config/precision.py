"""The one precision rule: which dtypes a run trains and answers in, decided from the recipe and the hardware.

Every stage asks here (training, the launcher's sharding checks, `ftkit estimate`, chat/predict/serve), so
the dtype a recipe trains in is the dtype every other verb assumes. The rule is a pure function of the
recipe and a `Hardware` value: estimate and the launcher pass `GPU_WITH_BF16` (what one rents to train)
and never import torch; only `detect_hardware` does.
"""

from __future__ import annotations

from dataclasses import dataclass

from ftkit.errors import FtkitError

DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class Hardware:
    cuda: bool  # training runs on a CUDA GPU
    bf16: bool  # that GPU trains in bf16


GPU_WITH_BF16 = Hardware(cuda=True, bf16=True)
CPU = Hardware(cuda=False, bf16=False)


def detect_hardware(use_cpu: bool = False) -> Hardware:
    import torch

    cuda = torch.cuda.is_available() and not use_cpu
    return Hardware(cuda=cuda, bf16=cuda and torch.cuda.is_bf16_supported())


@dataclass(frozen=True)
class Precision:
    bf16: bool  # bf16 mixed precision
    fp16: bool  # fp16 mixed precision
    dtype: str  # the weights' dtype
    compute_dtype: str  # 4-bit compute dtype
    trainable_dtype: str  # dtype of the trained weights (LoRA A/B, modules_to_save, or all weights)
    device: str  # "cuda" or "cpu"
    note: str = ""  # what was changed from the recipe, and why


def training_precision(model_args, sft: dict, hw: Hardware) -> Precision:
    """bf16/fp16 only where the hardware has it, with an actionable error instead of a mid-step crash.

    Unset bf16/fp16 means bf16 where the GPU has it, else float32 (TRL's default is bf16 everywhere). A GPU
    recipe's bf16/fp16 on a machine without a GPU trains in float32 with a note, so the recipe runs unchanged on a
    laptop (mixed precision on a CPU is slow, or missing, on most CPUs). QLoRA computes in the training precision,
    not in `dtype`, unless bnb_4bit_compute_dtype says so."""
    bf16, fp16, note = sft.get("bf16"), sft.get("fp16"), ""
    if bf16 and hw.cuda and not hw.bf16:
        raise FtkitError("bf16: true, but this GPU has no bf16 training support; set bf16: false "
                         "(or --set bf16=false) to train in float32")
    if (bf16 or fp16) and not hw.cuda:
        note = (f"{'bf16' if bf16 else 'fp16'}: true, but this machine has no GPU: training in float32 on the CPU "
                "(the recipe keeps its setting for a GPU)")
        bf16, fp16 = False, False
    if bf16 is None and not fp16:
        bf16 = hw.bf16
    mixed = "bfloat16" if bf16 else "float16" if fp16 else "float32"
    dtype = model_args.dtype if model_args.dtype and model_args.dtype != "auto" else mixed
    if not hw.cuda:
        dtype = "float32"  # half-precision weights on CPU train slowly or not at all
    if fp16 and not model_args.use_peft:
        dtype = "float32"  # fp16 AMP cannot unscale fp16 master weights
    compute = model_args.bnb_4bit_compute_dtype or mixed
    return Precision(bf16=bool(bf16), fp16=bool(fp16), dtype=dtype, compute_dtype=compute,
                     trainable_dtype=trainable_dtype(model_args, dtype, compute, bool(bf16), hw),
                     device="cuda" if hw.cuda else "cpu", note=note)


def trainable_dtype(model_args, dtype: str, compute: str, bf16: bool, hw: Hardware) -> str:
    """Full fine-tuning trains the weights in their dtype. LoRA keeps adapters in float32 (peft's
    autocast_adapter_dtype). A quantised model's trainable weights use the 4-bit compute dtype when training
    in bf16, else float32 (fp16 AMP cannot unscale fp16/bf16 master weights; a CPU computes in float32)."""
    if not model_args.use_peft:
        return dtype
    quantised = model_args.load_in_4bit or model_args.load_in_8bit
    if quantised and hw.cuda and bf16 and compute == "bfloat16":
        return "bfloat16"
    return "float32"


def inference_dtype(requested: str | None, hw: Hardware) -> str:
    """chat/predict/serve: --dtype, else bf16 on a GPU that has it, else float32."""
    if requested and requested != "auto":
        if requested not in DTYPES:
            raise FtkitError(f"--dtype {requested}: expected auto, bfloat16, float16 or float32")
        return requested
    return "bfloat16" if hw.cuda and hw.bf16 else "float32"
