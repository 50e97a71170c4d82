"""GPU memory of one training process, from a model's config.json and the recipe's choices alone (no weights,
no torch): the model behind `ftkit estimate` (whose --help gives the method) and behind ftkit's gradient
checkpointing default, which turns it on only where a run would not fit without it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ftkit.config.precision import GPU_WITH_BF16, Hardware, training_precision
from ftkit.errors import FtkitError

GIB = 2**30
GPUS = [("24 GB (RTX 4090, A10G, L4)", 24), ("40 GB (A100 40GB)", 40), ("80 GB (A100/H100 80GB)", 80)]
CUDA_CONTEXT_GIB = 1.0
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
NOT_GATED = {"gpt_neox", "gpt2", "gpt_bigcode", "opt", "phi", "bloom", "falcon", "gptj", "starcoder2"}
TIED_DEFAULT = {"llama": False, "mistral": False, "mixtral": False, "qwen2": False, "qwen3": False, "gemma": True,
                "gemma2": True, "gemma3_text": True, "gpt_neox": False, "baichuan": False, "phi3": False}


@dataclass
class Linear:
    name: str  # module name inside a decoder layer (what lora_target_modules matches)
    fan_in: int
    fan_out: int
    bias: bool = False

    @property
    def params(self) -> int:
        return self.fan_in * self.fan_out + (self.fan_out if self.bias else 0)


@dataclass
class Architecture:
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    gated: bool
    linears: list[Linear]  # per decoder layer
    norm_params: int  # per decoder layer (weights and biases of all its norms)
    final_norm_params: int
    embed_names: tuple[str, str]  # input embedding, output head
    notes: list[str] = field(default_factory=list)

    @property
    def linear_params(self) -> int:
        return self.layers * sum(lin.params for lin in self.linears)

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def total_params(self) -> int:
        return self.linear_params + self.layers * self.norm_params + self.final_norm_params + self.embedding_params


def _get(config: dict, *names, default=None):
    for name in names:
        if config.get(name) is not None:
            return config[name]
    return default


def _size(config: dict, *names, default=None):
    """A whole number of config.json under the first of `names` it has (`default` when none); a value of another
    type (a string "64", true) is one line naming its key, not a figure computed from it."""
    for name in names:
        value = config.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int):
                raise FtkitError(f"config.json: {name} is {json.dumps(value)}; it must be a whole number")
            return value
    return default


def _sizes(config: dict) -> tuple[int, ...]:
    """(hidden, layers, heads, vocab, kv_heads, head_dim, intermediate) of config.json, each checked: a figure
    computed from a nonsense shape would be trusted."""
    hidden = _size(config, "hidden_size", "n_embd", "d_model")
    layers = _size(config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _size(config, "num_attention_heads", "n_head")
    vocab = _size(config, "vocab_size")
    if None in (hidden, layers, heads, vocab):
        raise FtkitError("config.json lacks hidden_size, num_hidden_layers, num_attention_heads or vocab_size: "
                         "not a decoder-only language model ftkit can estimate")
    if min(hidden, layers, heads, vocab) < 1:
        raise FtkitError(f"config.json: hidden_size {hidden}, num_hidden_layers {layers}, num_attention_heads "
                         f"{heads} and vocab_size {vocab} must all be positive")
    kv_heads = _size(config, "num_key_value_heads", default=1 if config.get("multi_query") else heads)
    if kv_heads < 1 or heads % kv_heads:
        raise FtkitError(f"config.json: num_key_value_heads {kv_heads} must be positive and divide "
                         f"num_attention_heads {heads}")
    if config.get("head_dim") is None and hidden % heads:
        raise FtkitError(f"config.json: hidden_size {hidden} is not a multiple of num_attention_heads {heads}, and "
                         "there is no head_dim")
    head_dim = _size(config, "head_dim", default=hidden // heads)
    intermediate = _size(config, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)
    if min(head_dim, intermediate) < 1:
        raise FtkitError(f"config.json: head_dim {head_dim} and intermediate_size {intermediate} must be positive")
    return hidden, layers, heads, vocab, kv_heads, head_dim, intermediate


def architecture(config: dict) -> Architecture:
    """Shapes of every weight of a decoder-only model, from its config.json."""
    if isinstance(config.get("text_config"), dict):  # multimodal wrappers (Gemma 3, Llava): the language model
        config = {**config, **config["text_config"]}
    model_type = str(config.get("model_type", "")).lower()
    hidden, layers, heads, vocab, kv_heads, head_dim, intermediate = _sizes(config)
    tied = _get(config, "tie_word_embeddings", default=TIED_DEFAULT.get(model_type, True))
    gated = model_type not in NOT_GATED
    notes: list[str] = []
    q, kv = heads * head_dim, kv_heads * head_dim
    if model_type == "gpt_neox":
        bias = config.get("attention_bias", True)
        linears = [Linear("query_key_value", hidden, 3 * q, bias), Linear("dense", q, hidden, bias),
                   Linear("dense_h_to_4h", hidden, intermediate, True), Linear("dense_4h_to_h", intermediate, hidden, True)]
        norm, final, names = 4 * hidden, 2 * hidden, ("embed_in", "embed_out")
    elif model_type == "baichuan":
        linears = [Linear("W_pack", hidden, 3 * hidden), Linear("o_proj", hidden, hidden)]
        linears += _gated_mlp(hidden, intermediate, False)
        norm, final, names = 2 * hidden, hidden, ("embed_tokens", "lm_head")
    elif model_type == "phi3":
        linears = [Linear("qkv_proj", hidden, q + 2 * kv), Linear("o_proj", q, hidden),
                   Linear("gate_up_proj", hidden, 2 * intermediate), Linear("down_proj", intermediate, hidden)]
        norm, final, names = 2 * hidden, hidden, ("embed_tokens", "lm_head")
    else:
        if model_type not in TIED_DEFAULT:
            notes.append(f"model_type '{model_type}' is estimated with the Llama layout (q/k/v/o_proj, "
                         f"{'gate/up/down_proj' if gated else 'a two-layer MLP'})")
        attn_bias = bool(config.get("attention_bias", False))
        qkv_bias = attn_bias or model_type == "qwen2"
        linears = [Linear("q_proj", hidden, q, qkv_bias), Linear("k_proj", hidden, kv, qkv_bias),
                   Linear("v_proj", hidden, kv, qkv_bias), Linear("o_proj", q, hidden, attn_bias)]
        mlp_bias = bool(config.get("mlp_bias", False))
        linears += _gated_mlp(hidden, intermediate, mlp_bias) if gated else [
            Linear("fc1", hidden, intermediate, mlp_bias), Linear("fc2", intermediate, hidden, mlp_bias)]
        norm = 4 * hidden if model_type in ("gemma2", "gemma3_text", "gemma3") else 2 * hidden
        if model_type in ("qwen3", "gemma3_text", "gemma3", "olmo2"):
            norm += 2 * head_dim  # q_norm, k_norm
        final, names = hidden, ("embed_tokens", "lm_head")
    return Architecture(model_type, hidden, layers, heads, kv_heads, head_dim, intermediate, vocab, bool(tied), gated,
                        linears, norm, final, names, notes)


def _gated_mlp(hidden: int, intermediate: int, bias: bool) -> list[Linear]:
    return [Linear("gate_proj", hidden, intermediate, bias), Linear("up_proj", hidden, intermediate, bias),
            Linear("down_proj", intermediate, hidden, bias)]


# ------------------------------------------------------------------------------------------------------ estimating

@dataclass
class Setup:
    """What the recipe decides about memory, with ftkit's GPU defaults filled in."""
    use_peft: bool
    quant: str | None  # "4bit", "8bit" or None
    nested_quant: bool
    weight_dtype: str
    compute_dtype: str  # activations (and the 4-bit compute dtype)
    trainable_dtype: str
    lora_r: int
    lora_targets: list[str] | str
    lora_dropout: float
    use_dora: bool
    modules_to_save: list[str]
    optim: str
    batch: int
    max_length: int
    checkpointing: bool | None  # None: ftkit decides (on only where the run would not fit without it)
    method: str = "sft"
    reference: str = "none"  # preference methods: "copy" (a frozen copy of the weights), "adapter off", "precomputed"
    sequences: int = 1  # sequences per sample in one training forward: 2 for chosen + rejected


def reference_kind(method: str, use_peft: bool, sft: dict) -> str:
    """What a preference method's reference model costs: DPO/KTO keep a frozen copy under full fine-tuning (unless
    its log-probs are precomputed), reuse the weights with the adapter off under LoRA; ORPO/SimPO have none."""
    if method not in ("dpo", "kto"):
        return "none"
    if use_peft:
        return "adapter off"
    return "precomputed" if sft.get("precompute_ref_log_probs") else "copy"


def setup_from_recipe(recipe, hardware: Hardware = GPU_WITH_BF16) -> Setup:
    """The recipe's memory-relevant choices on `hardware` (default: a CUDA GPU with bf16, what one rents)."""
    m, s = recipe.model, recipe.sft
    precision = training_precision(m, s, hardware)
    weight, trainable = precision.dtype, precision.trainable_dtype
    quant = "4bit" if m.load_in_4bit else "8bit" if m.load_in_8bit else None
    mixed = "bfloat16" if precision.bf16 else "float16" if precision.fp16 else None
    compute = precision.compute_dtype if quant == "4bit" else (mixed or weight)  # activations
    return Setup(
        use_peft=m.use_peft, quant=quant, nested_quant=m.use_bnb_nested_quant, weight_dtype=weight,
        compute_dtype=compute, trainable_dtype=trainable, lora_r=m.lora_r,
        lora_targets=m.lora_target_modules or "all-linear", lora_dropout=m.lora_dropout, use_dora=m.use_dora,
        modules_to_save=list(m.lora_modules_to_save or []), optim=s.get("optim") or "adamw_torch_fused",
        batch=s.get("per_device_train_batch_size") or 8, max_length=recipe.sft_value("max_length") or 1024,
        checkpointing=recipe.checkpointing(), method=recipe.method,
        reference=reference_kind(recipe.method, m.use_peft, s),
        sequences=2 if recipe.method in ("dpo", "orpo", "simpo", "cpo") else 1,  # chosen and rejected in one forward
    )


def optimizer_bytes(optim: str, trainable: int, trainable_bytes: float, matrices: list[tuple[int, int]]) -> tuple[float, str]:
    """-> (bytes of optimizer state, how it was counted). trainable_bytes: the trainable weights' own bytes (torch
    optimizers keep their states in each weight's dtype)."""
    o = optim.lower()
    if o.startswith("adafactor") or o == "galore_adafactor":
        factored = sum(4 * (rows + cols) for rows, cols in matrices)
        return factored, "Adafactor: a row and a column of float32 per matrix"
    if o.startswith("sgd") or o in ("lomo", "adalomo"):
        return 0, f"{optim}: no state (momentum 0)"
    if "8bit" in o:
        states = 3 if "ademamix" in o else 1 if ("lion" in o or "rmsprop" in o) else 2
        return states * trainable, f"{optim}: {states} state(s) x 1 byte"
    if "4bit" in o:
        return trainable, f"{optim}: 2 states x 4 bits"
    bnb32 = "32bit" in o or o in ("rmsprop_bnb", "adamw_bnb")
    per_state = 4 * trainable if bnb32 else trainable_bytes
    states = 3 if "ademamix" in o else 1 if ("lion" in o or "rmsprop" in o or "adagrad" in o) else 2
    where = "float32" if bnb32 else "weight-dtype"
    note = "" if o.startswith(("adamw", "paged_adamw", "lion", "paged_lion", "rmsprop", "adagrad", "ademamix",
                               "paged_ademamix", "stable_adamw", "schedule_free")) else " (assumed Adam-like)"
    return states * per_state, f"{optim}: {states} {where} state(s){note}"


def targeted(arch: Architecture, targets) -> list[Linear]:
    if targets == "all-linear" or targets == ["all-linear"]:
        return list(arch.linears)
    names = [targets] if isinstance(targets, str) else list(targets)
    return [lin for lin in arch.linears if any(lin.name == n or lin.name.endswith("." + n) for n in names)]


def weight_bytes(arch: Architecture, setup: Setup) -> tuple[float, str]:
    other = arch.total_params - arch.linear_params  # embeddings, lm_head, norms
    if setup.quant == "4bit":
        scale = (1 + 4 / 256) / 64 if setup.nested_quant else 4 / 64
        return arch.linear_params * (0.5 + scale) + other * 4, "4-bit linears, float32 rest"
    if setup.quant == "8bit":
        rows = arch.layers * sum(lin.fan_out for lin in arch.linears)
        return arch.linear_params + rows * 4 + other * 4, "8-bit linears, float32 rest"
    return arch.total_params * DTYPE_BYTES[setup.weight_dtype], setup.weight_dtype


def trainable_parts(arch: Architecture, setup: Setup, notes: list[str]) -> dict:
    """Trainable parameter count, their extra memory, gradients, and the matrices an optimizer keeps state for."""
    wbytes, tbytes = DTYPE_BYTES[setup.weight_dtype], DTYPE_BYTES[setup.trainable_dtype]
    if not setup.use_peft:
        matrices = [(x.fan_out, x.fan_in) for x in arch.linears for _ in range(arch.layers)]
        matrices += [(arch.vocab, arch.hidden)] * (1 if arch.tied else 2)
        grads = arch.total_params * wbytes
        return {"trainable": arch.total_params, "copies": 0, "memory": 0, "gradients": grads, "matrices": matrices}
    lin = targeted(arch, setup.lora_targets)
    if not lin:
        notes.append(f"lora_target_modules {setup.lora_targets} match no linear layer of this architecture")
    r = setup.lora_r
    lora = arch.layers * sum(r * (x.fan_in + x.fan_out) + (x.fan_out if setup.use_dora else 0) for x in lin)
    matrices = [(r, x.fan_in) for x in lin for _ in range(arch.layers)] + \
               [(x.fan_out, r) for x in lin for _ in range(arch.layers)]
    saved = [n for n in setup.modules_to_save if n in arch.embed_names or n in ("embed_tokens", "lm_head")]
    copies = len(saved) * arch.vocab * arch.hidden
    matrices += [(arch.vocab, arch.hidden)] * len(saved)
    copy_bytes = DTYPE_BYTES["bfloat16"] if setup.quant and setup.trainable_dtype == "bfloat16" else \
        4 if setup.quant else wbytes
    memory = lora * tbytes + copies * copy_bytes
    unknown = [n for n in setup.modules_to_save if n not in saved]
    if unknown:
        notes.append(f"lora_modules_to_save {unknown} not counted (only embedding/lm_head copies are)")
    return {"trainable": lora + copies, "copies": copies, "memory": memory, "gradients": memory, "matrices": matrices}


def activation_bytes(arch: Architecture, setup: Setup) -> tuple[float, float]:
    """-> (with gradient checkpointing, without) for batch x max_length tokens."""
    abytes, tokens = DTYPE_BYTES[setup.compute_dtype], setup.batch * setup.sequences * setup.max_length
    h, i, q, kv = arch.hidden, arch.intermediate, arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    norm = 3 * h if abytes < 4 else 2 * h  # input (kept in float32 by RMSNorm) and output
    attention = 3 * q + 3 * kv  # q, k, v; q, k after RoPE; attention output
    mlp = 4 * i if arch.gated else 2 * i
    dropout = 0
    if setup.use_peft and setup.lora_dropout > 0:  # each adapted linear keeps its own dropped-out input
        dropout = sum(x.fan_in for x in targeted(arch, setup.lora_targets))
    per_layer = (2 * norm + attention + mlp + dropout) * abytes
    head = norm * abytes + arch.vocab * (abytes + 4 + 4)  # logits, float32 copy, log-softmax
    return tokens * (arch.layers * h * abytes + per_layer + head), tokens * (arch.layers * per_layer + head)


def estimate(config: dict, setup: Setup) -> dict:
    arch = architecture(config)
    notes = list(arch.notes)
    weights, weights_label = weight_bytes(arch, setup)
    parts = trainable_parts(arch, setup, notes)
    trainable_bytes = parts["gradients"]  # one value per trainable parameter, in its dtype
    optim_mem, optim_label = optimizer_bytes(setup.optim, parts["trainable"], trainable_bytes, parts["matrices"])
    act_ckpt, act_full = activation_bytes(arch, setup)
    reference = arch.total_params * DTYPE_BYTES[setup.weight_dtype] if setup.reference == "copy" else 0
    fixed = weights + reference + parts["memory"] + parts["gradients"] + optim_mem
    totals = {True: fixed + act_ckpt, False: fixed + act_full}
    total_mem = totals[setup.checkpointing is not False]  # auto: the least the run needs, what "fits" means
    return {
        "model_type": arch.model_type,
        "parameters": arch.total_params,
        "layers": arch.layers, "hidden_size": arch.hidden, "vocab_size": arch.vocab, "tied_embeddings": arch.tied,
        "trainable_parameters": parts["trainable"],
        "lora_parameters": parts["trainable"] - parts["copies"] if setup.use_peft else 0,
        "bytes": {
            "weights": weights, "reference_model": reference, "trainable_copies": parts["memory"],
            "gradients": parts["gradients"],
            "optimizer_states": optim_mem, "activations_checkpointing": act_ckpt, "activations_no_checkpointing":
            act_full, "total": total_mem, "total_checkpointing": totals[True], "total_no_checkpointing": totals[False],
        },
        "labels": {"weights": weights_label, "optimizer": optim_label, "trainable": setup.trainable_dtype,
                   "activations": setup.compute_dtype},
        "tokens_per_batch": setup.batch * setup.sequences * setup.max_length,
        "reference": setup.reference,
        "fits": {name: fits(total_mem, size * GIB) for name, size in GPUS},
        "notes": notes,
    }




def fits(total: float, gpu_bytes: float) -> bool:
    """Whether `total` bytes fit on a GPU of `gpu_bytes`, leaving room for the CUDA context and kernels."""
    return total <= gpu_bytes - CUDA_CONTEXT_GIB * GIB


def checkpointing_needed(result: dict, gpu_bytes: float) -> bool:
    """ftkit's default: gradient checkpointing only where the run would not fit without it. It costs a second
    forward per layer (7-17% of the step on a CPU, bench/RESULTS.md) and saves activations (LoRA on a 1.1B Llama:
    11.4 -> 3.0 GiB peak on an H200)."""
    return not fits(result["bytes"]["total_no_checkpointing"], gpu_bytes)
