"""On a CPU, ftkit computes the SFT loss from the full logits instead of TRL's fused LM head (train/lm_head.py):
the same loss, per-token outputs and gradients as TRL's head on the same batch, TRL's head wherever this one
does not apply, and training through it still memorises."""

from __future__ import annotations

import types

import pytest

SFT_OUTPUTS = ("log_probs", "entropy", "is_top1")


def heads(tiny_model):
    """(TRL's fused head as SFTTrainer adds it, the same model with ftkit's forward over it)."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from ftkit.train.lm_head import materialised_forward

    trl_model, ftkit_model = (AutoModelForCausalLM.from_pretrained(tiny_model) for _ in range(2))
    for model in (trl_model, ftkit_model):  # TRL's patch keeps its model's own forward in a closure: no deepcopy
        add_fused_lm_head(model, outputs=SFT_OUTPUTS)
    ftkit_model.forward = types.MethodType(materialised_forward(ftkit_model.forward, trl_model.config.vocab_size),
                                           ftkit_model)
    return trl_model, ftkit_model


def batch(vocab: int):
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (3, 40), generator=generator)
    labels = ids.clone()
    labels[:, :12] = -100
    labels[1, 25:] = -100  # a shorter answer, as padding leaves it
    return ids, labels


@pytest.mark.parametrize("num_items", [None, 70])
def test_the_outputs_and_gradients_equal_trls_fused_head(tiny_model, num_items):
    import torch

    trl_model, ftkit_model = heads(tiny_model)
    ids, labels = batch(trl_model.config.vocab_size)
    count = None if num_items is None else torch.tensor(num_items)
    outputs = []
    for model in (trl_model, ftkit_model):
        out = model(input_ids=ids, labels=labels, fused_lm_head=True, num_items_in_batch=count)
        out.loss.backward()
        outputs.append(out)
    trl_out, ftkit_out = outputs
    torch.testing.assert_close(ftkit_out.loss, trl_out.loss)
    for field in ("log_probs", "entropy"):
        torch.testing.assert_close(getattr(ftkit_out, field), getattr(trl_out, field), atol=1e-5, rtol=1e-5)
    assert torch.equal(ftkit_out.is_top1.bool(), trl_out.is_top1.bool())
    assert torch.equal(ftkit_out.label_mask, trl_out.label_mask)
    for (name, trl_param), ftkit_param in zip(trl_model.named_parameters(), ftkit_model.parameters()):
        torch.testing.assert_close(ftkit_param.grad, trl_param.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_trls_head_takes_what_this_one_does_not(tiny_model, monkeypatch):
    """Logits above LOGITS_BYTES, pre-shifted labels and plain (generation) calls go to TRL's forward."""
    import ftkit.train.lm_head as lm_head

    trl_model, ftkit_model = heads(tiny_model)
    ids, labels = batch(trl_model.config.vocab_size)
    taken = []
    monkeypatch.setattr(lm_head, "head_outputs", lambda *args: taken.append(args) or None)
    monkeypatch.setattr(lm_head, "LOGITS_BYTES", ids.numel() * trl_model.config.vocab_size * 4 - 1)
    assert ftkit_model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs is not None
    assert ftkit_model(input_ids=ids, shift_labels=labels, labels=labels, fused_lm_head=True).loss is not None
    assert ftkit_model(input_ids=ids).logits.shape[-1] == trl_model.config.vocab_size
    assert taken == []
    monkeypatch.setattr(lm_head, "LOGITS_BYTES", ids.numel() * trl_model.config.vocab_size * 4)
    ftkit_model(input_ids=ids, labels=labels, fused_lm_head=True)
    assert len(taken) == 1


@pytest.mark.parametrize("device,config,used", [("cpu", {}, True), ("cuda", {}, False),
                                                ("cpu", {"final_logit_softcapping": 30.0}, False),
                                                ("cpu", {"output_router_logits": True}, False)])
def test_only_on_a_cpu_and_only_for_an_unscaled_head(tiny_model, device, config, used):
    from ftkit.train.lm_head import use_materialised_head

    trl_model, _ = heads(tiny_model)
    for key, value in config.items():
        setattr(trl_model.config, key, value)
    trl_forward, lines = trl_model.forward, []
    trainer = types.SimpleNamespace(model=trl_model)
    assert use_materialised_head(trainer, device, lines.append) is used
    assert (trl_model.forward is not trl_forward) is used
    assert len(lines) == int(used)


def test_a_cpu_run_trains_through_it(trained_run):
    """The shared trained run (memorised, as tests/test_train.py and tests/test_chat.py assert) used this head."""
    assert "faster than TRL's fused LM head on a CPU" in (trained_run / "train.log").read_text(encoding="utf-8")
