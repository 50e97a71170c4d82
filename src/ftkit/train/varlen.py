"""Packed rows on sdpa without the cost of a dense mask: attention one sample at a time.

With padding_free or packing, TRL's collator sends one long row whose position_ids restart at each sample.
Without flash-attention, transformers then builds a dense block-diagonal mask over the whole row and sdpa attends
over all of it (quadratic in the row, not in each sample) through its slowest kernel, the one that takes a mask.
Flash-attention's varlen kernel skips the blocks between samples; this does the same with sdpa's causal kernel,
one sample at a time. Library gap: transformers has no varlen path for sdpa.

Any other forward (a padding mask, a cache, a row without restarts) goes to transformers' own sdpa unchanged, with
the mask transformers built. Models with sliding-window or soft-capped attention keep transformers' sdpa.
"""

from __future__ import annotations

NAME = "ftkit_sdpa_varlen"


def segment_bounds(position_ids) -> list[list[tuple[int, int]]]:
    """Per row, the [start, end) of each sample: a sample starts where the position does not follow on."""
    import torch

    starts = torch.diff(position_ids, dim=-1) != 1
    bounds = []
    length = position_ids.shape[-1]
    for row in starts.tolist():
        cuts = [0, *[i + 1 for i, cut in enumerate(row) if cut], length]
        bounds.append(list(zip(cuts[:-1], cuts[1:])))
    return bounds


def packed_rows(module, query, key, kwargs) -> list[list[tuple[int, int]]] | None:
    """The samples of each row when this call is a packed training forward this kernel may take; else None."""
    position_ids = kwargs.get("position_ids")
    if position_ids is None or query.shape[2] != key.shape[2] or query.shape[2] < 2:
        return None
    if position_ids.shape[0] != query.shape[0]:
        position_ids = position_ids.expand(query.shape[0], -1)
    bounds = segment_bounds(position_ids)
    return bounds if any(len(row) > 1 for row in bounds) else None


def varlen_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention-function signature: query (batch, heads, length, dim) -> (batch, length, heads,
    dim), None."""
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    rows = packed_rows(module, query, key, kwargs)
    if rows is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    output = torch.empty_like(query)
    for b, samples in enumerate(rows):
        for start, end in samples:
            output[b:b + 1, :, start:end] = torch.nn.functional.scaled_dot_product_attention(
                query[b:b + 1, :, start:end], key[b:b + 1, :, start:end], value[b:b + 1, :, start:end],
                dropout_p=dropout, scale=scaling, is_causal=True)
    return output.transpose(1, 2).contiguous(), None


def varlen_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                attention_mask=None, **kwargs):
    """No mask where the forward needs none: a causal (or packed) forward without padding and without a cache,
    which varlen_sdpa_forward runs with sdpa's causal kernel per sample; otherwise transformers' sdpa mask."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and q_offset == 0 and kv_offset == 0 and q_length == kv_length:
        return None
    return sdpa_mask(batch_size, q_length, kv_length, q_offset=q_offset, kv_offset=kv_offset,
                     attention_mask=attention_mask, **kwargs)


def register() -> str:
    """Make NAME known to transformers (its attention and mask registries); -> NAME. Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_sdpa_forward)
    AttentionMaskInterface.register(NAME, varlen_mask)
    return NAME


def use_varlen(model, recipe, log=print) -> bool:
    """Switch an sdpa model that trains packed rows (packing or padding_free) to NAME, kept only when the probe
    shows it keeps packed samples apart (a model that does not hand position_ids to its attention would not);
    -> whether it is on. torch_compile keeps transformers' sdpa: the per-sample loop would break its graph."""
    from ftkit.train.packing import leaks_across_samples

    s = recipe.sft
    packed = s.get("packing") or s.get("padding_free")
    if not packed or recipe.method != "sft" or s.get("torch_compile"):
        return False
    config = model.config
    if (recipe.model.attn_implementation or "sdpa") != "sdpa" or getattr(config, "_attn_implementation", "") != "sdpa":
        return False
    if (getattr(config, "sliding_window", None) or getattr(config, "attn_logit_softcapping", None)
            or set(getattr(config, "layer_types", None) or ["full_attention"]) != {"full_attention"}):
        return False  # per-sample causal attention is not what these layers compute
    model.set_attn_implementation(register())
    if model.config._attn_implementation != NAME or leaks_across_samples(model) is not False:
        model.set_attn_implementation("sdpa")
        return False
    log("note: packed rows on sdpa: attention runs one sample at a time (ftkit's varlen sdpa), not over the whole "
        "row; same gradients, less time")
    return True
