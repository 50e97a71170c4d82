"""Model stage: tokenizer (pad token, chat template, missing special tokens), precision, quantisation,
embedding size, and the PEFT wrapper."""

from __future__ import annotations

from ftkit.config import quantization
from ftkit.config.arguments import ModelArguments
from ftkit.config.precision import Precision
from ftkit.data.chat_format import ChatFormat
from ftkit.config.templates import BUILTIN_TEMPLATES, resolve_template
from ftkit.errors import FtkitError
from ftkit.hub import load_failure

PAD_CANDIDATE = "<|pad|>"


def load_tokenizer(model_args: ModelArguments, template_spec: str | None, log=print,
                   template_kwargs: dict | None = None):
    """-> (tokenizer, ChatFormat, added tokens). Adds tokens the template needs and a pad token distinct from eos."""
    from transformers import AutoTokenizer

    name = model_args.tokenizer_name_or_path or model_args.model_name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=model_args.model_revision,
                                                  trust_remote_code=model_args.trust_remote_code)
    except Exception as err:
        raise FtkitError(f"tokenizer '{name}' could not be loaded: {load_failure(err)}") from None
    template = resolve_template(template_spec) or tokenizer.chat_template
    if not template:
        template = BUILTIN_TEMPLATES["alpaca"]
        template_spec = "alpaca"
        log("note: the tokenizer has no chat template; using the built-in 'alpaca' template (answers end with eos)")
    if isinstance(template, dict):  # some tokenizers ship several named templates
        template = template.get("default") or next(iter(template.values()))
    tokenizer.chat_template = template
    label = template_label(template_spec, name)
    chat_format = ChatFormat(tokenizer, template, template_kwargs, label)
    special, plain = chat_format.missing_tokens()
    if special or plain:
        from tokenizers import AddedToken

        if special:
            tokenizer.add_special_tokens({"additional_special_tokens": special}, replace_extra_special_tokens=False)
        if plain:  # words the model writes in its answers (<think>, <tool_call>): decoding must keep them
            tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
        log(f"note: added {len(special) + len(plain)} token(s) the chat template needs: {' '.join(special + plain)}; "
            "their embeddings are initialised to the mean and trained")
        chat_format = ChatFormat(tokenizer, template, template_kwargs, label)
    ensure_pad_token(tokenizer, chat_format, log)
    return tokenizer, chat_format, special + plain


def template_label(spec: str | None, tokenizer_name: str) -> str:
    """How errors name the template: the built-in's or file's name, or whose it is."""
    from pathlib import Path

    if not spec:
        return f"the chat template of '{tokenizer_name}'"
    if spec in BUILTIN_TEMPLATES:
        return f"the built-in chat template '{spec}'"
    if "{" in spec:
        return "the recipe's inline chat_template"
    return f"the chat template '{Path(spec).name}'"


def ensure_pad_token(tokenizer, chat_format: ChatFormat, log=print) -> None:
    """A pad token that is no stop token (eos, end of turn, end of a tool call), so those never look like padding."""
    reserved = set(chat_format.stop_strings())
    if tokenizer.pad_token is not None and tokenizer.pad_token not in reserved:
        return
    if tokenizer.unk_token is not None and tokenizer.unk_token not in reserved:
        tokenizer.pad_token = tokenizer.unk_token
        log(f"note: pad token set to {tokenizer.unk_token} (the tokenizer had none distinct from eos)")
        return
    tokenizer.add_special_tokens({"pad_token": PAD_CANDIDATE})
    log(f"note: added pad token {PAD_CANDIDATE} (the tokenizer had none distinct from eos/end-of-turn)")


def load_model(model_args: ModelArguments, precision: Precision, device_index: int = 0,
               init_kwargs: dict | None = None):
    """The base model; `init_kwargs` is the recipe's model_init_kwargs (keys the recipe owns are refused earlier)."""
    import torch
    from transformers import AutoModelForCausalLM

    quant = quantization.bnb_config(quantization.settings(model_args), precision.compute_dtype)
    kwargs = dict(
        **(init_kwargs or {}),
        revision=model_args.model_revision,
        trust_remote_code=model_args.trust_remote_code,
        dtype=getattr(torch, precision.dtype),
        attn_implementation=model_args.attn_implementation,
        quantization_config=quant,
    )
    if quant is not None:  # each process loads its quantised copy onto its own device
        kwargs["device_map"] = {"": device_index if precision.device == "cuda" else "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **kwargs)
    except (OSError, ValueError, ImportError) as err:
        raise FtkitError(f"model '{model_args.model_name_or_path}' could not be loaded: {load_failure(err)}") from None
    keep_4bit_training_layout(model)
    return model


def keep_4bit_training_layout(model) -> int:
    """Library gap: on a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit layer's weights for its inference
    kernel at the first no-grad forward in eval mode, rounding the block scales to bfloat16, and keeps that layout
    for training. One forward before training (ftkit's packing probe, the before-training samples) made a QLoRA
    run end at twice plain TRL's loss (tests/test_qlora_parity.py). Layers of a model being trained opt out."""
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def fit_embeddings(model, tokenizer, log=print) -> bool:
    """Grow the embedding matrix to the tokenizer, new rows set to the mean of the old ones. -> resized?"""
    import torch

    old = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= old:
        return False
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        for matrix in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}.values():
            weight = matrix.weight
            weight[old:] = weight[:old].float().mean(dim=0).to(weight.dtype)
    log(f"note: embedding matrix resized from {old} to {len(tokenizer)} rows")
    return True


def apply_peft(model, model_args: ModelArguments, new_tokens: bool, gradient_checkpointing: bool, log=print):
    """LoRA/DoRA/rsLoRA; when tokens were added, embed_tokens and lm_head are trained and saved too."""
    from peft import get_peft_model

    model = prepare_kbit(model, model_args, gradient_checkpointing)
    return get_peft_model(model, lora_config(model, model_args, new_tokens, log))


def prepare_kbit(model, model_args: ModelArguments, gradient_checkpointing: bool):
    """peft's preparation of a 4-/8-bit model for training (norms and head in float32, input gradients)."""
    if not (model_args.load_in_4bit or model_args.load_in_8bit):
        return model
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)


def lora_config(model, model_args: ModelArguments, new_tokens: bool, log=print):
    """The recipe's LoraConfig (for a trainer that wraps the model itself)."""
    from peft import LoraConfig

    to_save = list(model_args.lora_modules_to_save or [])
    if new_tokens:
        for name in embedding_module_names(model):
            if name not in to_save:
                to_save.append(name)
                log(f"note: '{name}' is trained in full and saved with the adapter, so the new tokens are learned")
    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules or "all-linear",
        target_parameters=model_args.lora_target_parameters,
        modules_to_save=to_save or None,
        task_type=model_args.lora_task_type,
        use_rslora=model_args.use_rslora,
        use_dora=model_args.use_dora,
    )


def embedding_module_names(model) -> list[str]:
    names = {m: n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
    out = [names[model.get_input_embeddings()]]
    head = model.get_output_embeddings()
    if head is not None and head is not model.get_input_embeddings():
        out.append(names[head])
    return out


def trainable_summary(model) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)"
