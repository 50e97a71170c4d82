"""Packing guard: in a packed row, a sample must not see the samples before it.

transformers keeps packed samples apart (restarting position_ids, no attention mask, no cache) only in models
whose forward hands position_ids to its mask builder. Most do; some architectures do not (bloom, opt and mpt,
measured) and remote code may not, and `ftkit validate` sees the attention kernel but not the architecture.
So before training, one probe on the real model: two packed rows that differ only in their first sample must
give the second sample the same logits. Library gap: neither transformers nor TRL checks this.
"""

from __future__ import annotations

from ftkit.errors import FtkitError

PROBE_LENGTH = 6


def probe_batches(vocab: int) -> list[dict]:
    """Two padding-free batches as TRL's collator builds them: [first_i, second] with the same second sample."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    generator = torch.Generator().manual_seed(0)
    firsts, second = torch.randint(0, vocab, (3, PROBE_LENGTH), generator=generator).split([2, 1])
    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    return [collate([{"input_ids": first.tolist()}, {"input_ids": second[0].tolist()}]) for first in firsts]


def leaks_across_samples(model) -> bool | None:
    """Whether the second packed sample's logits depend on the first; None when the weights are not all here
    (a DeepSpeed ZeRO-3 partition or FSDP's meta copy on other ranks) and no forward can run yet."""
    import torch

    params = list(model.parameters())
    if any(p.device.type == "meta" or hasattr(p, "ds_id") for p in params):
        return None
    embeddings = model.get_input_embeddings().weight
    logits = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in probe_batches(embeddings.shape[0]):
                inputs = {k: v.to(embeddings.device) if isinstance(v, torch.Tensor) else v
                          for k, v in batch.items() if k != "labels"}
                logits.append(model(**inputs, use_cache=False).logits[0, PROBE_LENGTH:].float())
    finally:
        model.train(was_training)
    slack = 1e-3 * logits[0].abs().max().item()  # the same forward twice; room only for kernel nondeterminism
    return not torch.allclose(logits[0], logits[1], rtol=0, atol=slack)


def check_packing(model, recipe, log=print) -> None:
    """Refuse packing/padding_free when this model lets packed samples attend to each other."""
    option = next((key for key in ("packing", "padding_free") if recipe.sft.get(key)), None)
    if option is None:
        return
    from ftkit.config.launch_plan import plan_from_environment

    # Every rank decides alike: one rank refusing while the others wait would hang the launch.
    leaks = None if plan_from_environment().shards_parameters else leaks_across_samples(model)
    if leaks is None:
        log(f"note: {option}: the weights are sharded (FSDP/ZeRO-3), so ftkit could not probe that this model keeps "
            "packed samples apart (bloom, opt and mpt do not)")
        return
    if leaks:
        config = getattr(model, "config", None)
        kind = getattr(config, "model_type", "this")
        impl = getattr(config, "_attn_implementation", None) or "sdpa"
        where = f"{recipe.path}: " if recipe.path else ""
        raise FtkitError(f"{where}'{option}': {kind} models with attn_implementation {impl} let a packed sample "
                         f"attend to the samples before it in the row; set {option}: false")
