"""The one place a bitsandbytes quantisation config is built, for training and for loading a run again.

Training records `settings()` in ftkit_run.json; chat/predict/serve rebuild the same config from it, so
an fp4 or nested-quant QLoRA run is answered on the base it was trained on, not on an nf4 default.
"""

from __future__ import annotations

KEYS_4BIT = ("bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_quant_storage")


def settings(model_args) -> dict | None:
    """The recipe's quantisation as plain JSON values; None for an unquantised model."""
    if model_args.load_in_4bit:
        return {"load_in_4bit": True, "bnb_4bit_quant_type": model_args.bnb_4bit_quant_type,
                "bnb_4bit_use_double_quant": bool(model_args.use_bnb_nested_quant),
                "bnb_4bit_quant_storage": model_args.bnb_4bit_quant_storage or "uint8"}
    if model_args.load_in_8bit:
        return {"load_in_8bit": True}
    return None


def bnb_config(quant: dict | None, compute_dtype: str):
    """transformers' BitsAndBytesConfig for `settings()`; None when there is nothing to quantise."""
    if not quant:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if quant.get("load_in_8bit"):
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.get("bnb_4bit_quant_type", "nf4"),
        bnb_4bit_use_double_quant=bool(quant.get("bnb_4bit_use_double_quant")),
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
        bnb_4bit_quant_storage=getattr(torch, quant.get("bnb_4bit_quant_storage") or "uint8"),
    )
