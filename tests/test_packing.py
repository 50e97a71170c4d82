"""Packing and padding-free training: transformers keeps packed sequences apart on sdpa and eager in a training
forward, so a packed step equals the padded step; ftkit trains with either and keeps its own loss masks; the
combinations that do let samples attend to each other are refused: kernels and strategies by `ftkit validate`,
architectures by a probe before training."""

from __future__ import annotations

import json

import pytest

from ftkit.config.recipe import load_recipe
from tests.helpers import assert_memorised, ftkit, make_recipe

QUIET = dict(log=lambda *_: None)
# (length, prompt tokens without loss): unequal lengths, so padding and packing both matter.
SHAPES = [(9, 4), (17, 6), (5, 2), (12, 5)]


def line_of(path, key: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if line.startswith(f"{key}:"))


def samples() -> list[dict]:
    import torch

    generator = torch.Generator().manual_seed(0)
    rows = []
    for length, prompt in SHAPES:
        ids = torch.randint(4, 1000, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def trainer_step(tiny_model, tmp_path, impl: str, **config) -> tuple[float, dict]:
    """(loss, gradients) of one step over all samples through SFTTrainer.compute_loss, as training runs it."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=impl, dtype=torch.float32)
    args = SFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=len(SHAPES), use_cpu=True,
                     bf16=False, report_to="none", activation_checkpointing=False,  # which would force no cache
                     **{"max_length": 1024, **config})
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(samples()))
    batch = next(iter(trainer.get_train_dataloader()))
    assert ("attention_mask" in batch) is not bool(config.get("packing") or config.get("padding_free"))
    model.train()
    loss = trainer.compute_loss(model, dict(batch))  # compute_loss itself says use_cache=False
    loss.backward()
    return loss.item(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_transformers_keeps_packed_sequences_apart_in_a_training_forward(impl, tiny_model, tmp_path):
    """Why packing is allowed on sdpa and eager: with restarting position_ids, no attention mask and no cache,
    transformers' masking_utils builds a block-diagonal causal mask. Fails if a release stops doing so (a packed
    sequence would attend to the one before it: on the tiny conversations, logits 0.57 and gradients 3.5e-2 apart
    when a cache skips that mask)."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    rows = samples()
    padded = DataCollatorForLanguageModeling(pad_token_id=3)(rows)
    packed = DataCollatorForLanguageModeling(pad_token_id=3, padding_free=True)(rows)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=impl, dtype=torch.float32).train()
    with torch.no_grad():
        alone = model(**{k: v for k, v in padded.items() if k != "labels"}, use_cache=False).logits
        together = model(**{k: v for k, v in packed.items() if k != "labels"}, use_cache=False).logits[0]
    start = 0
    for row, (length, _) in enumerate(SHAPES):
        torch.testing.assert_close(together[start:start + length], alone[row, :length], atol=1e-5, rtol=0)
        start += length

    loss, grads = trainer_step(tiny_model, tmp_path, impl)
    for config in (dict(packing=True, packing_strategy="bfd"), dict(padding_free=True, max_length=None)):
        # use_cache=True (a recipe may say so) makes the model's config ask for a cache, which would skip the
        # packed-sequence mask: compute_loss must still run the forward without one.
        packed_loss, packed_grads = trainer_step(tiny_model, tmp_path, impl, use_cache=True, **config)
        assert packed_loss == pytest.approx(loss, abs=1e-5), config
        for name, grad in grads.items():
            torch.testing.assert_close(packed_grads[name], grad, atol=1e-6, rtol=0, msg=f"{config} {name}")


def count_causal_sdpa_calls(monkeypatch) -> list[int]:
    """Patch torch's sdpa to count the calls that take the causal kernel without a mask (the per-sample path)."""
    import torch

    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        if kwargs.get("is_causal") and kwargs.get("attn_mask") is None:
            calls.append(args[0].shape[2])
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    return calls


def test_varlen_sdpa_trains_exactly_as_transformers_dense_mask(tiny_model, tmp_path, monkeypatch):
    """ftkit's per-sample sdpa (train/varlen.py) beside transformers' own sdpa, which attends over the whole packed
    row through a block-diagonal mask: the same loss and gradients, from attention one sample at a time."""
    import torch

    from ftkit.train.varlen import register

    loss, grads = trainer_step(tiny_model, tmp_path, "sdpa", padding_free=True, max_length=None)
    calls = count_causal_sdpa_calls(monkeypatch)
    for config in (dict(padding_free=True, max_length=None), dict(packing=True, packing_strategy="bfd")):
        calls.clear()
        varlen_loss, varlen_grads = trainer_step(tiny_model, tmp_path, register(), use_cache=True, **config)
        assert sorted(calls) == sorted(length for length, _ in SHAPES for _layer in range(2)), config
        assert varlen_loss == pytest.approx(loss, abs=1e-6), config
        for name, grad in grads.items():
            torch.testing.assert_close(varlen_grads[name], grad, atol=1e-6, rtol=0, msg=f"{config} {name}")


def test_varlen_sdpa_leaves_padded_and_cached_forwards_to_transformers(tiny_model):
    """The same model object also answers eval prompts (padded batches, a cache): those forwards must be sdpa's."""
    import torch
    from transformers import AutoModelForCausalLM

    from ftkit.train.varlen import register

    sdpa = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa", dtype=torch.float32)
    varlen = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa", dtype=torch.float32)
    varlen.set_attn_implementation(register())
    ids = torch.tensor([[3, 3, 17, 52, 9, 400], [5, 6, 7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        torch.testing.assert_close(varlen(input_ids=ids, attention_mask=mask).logits,
                                   sdpa(input_ids=ids, attention_mask=mask).logits, atol=1e-6, rtol=0)
        settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=3)
        assert varlen.generate(ids, attention_mask=mask, **settings).tolist() == sdpa.generate(
            ids, attention_mask=mask, **settings).tolist()


def test_train_uses_varlen_sdpa_only_where_the_probe_passes(tiny_model, tiny_opt, tmp_path, monkeypatch):
    """On for packed rows of a model that hands position_ids to its attention; back to sdpa when the probe sees a
    leak; off for padded batches and for kernels the recipe chose."""
    from transformers import AutoModelForCausalLM

    from ftkit.train import packing, varlen

    def decide(model_dir, **overrides):
        recipe = load_recipe(make_recipe(tmp_path, model_dir, "v", **overrides))
        model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=recipe.model.attn_implementation)
        on = varlen.use_varlen(model, recipe, **QUIET)
        return on, model.config._attn_implementation

    assert decide(tiny_model, padding_free=True) == (True, varlen.NAME)
    assert decide(tiny_model, packing=True) == (True, varlen.NAME)
    assert decide(tiny_model, padding_free=False) == (False, "sdpa")
    assert decide(tiny_model, padding_free=True, attn_implementation="eager") == (False, "eager")
    assert decide(tiny_model, padding_free=True, torch_compile=True) == (False, "sdpa")
    monkeypatch.setattr(packing, "leaks_across_samples", lambda model: True)
    assert decide(tiny_model, padding_free=True) == (False, "sdpa")


def test_packing_keeps_ftkits_loss_masks(tiny_model, tmp_path):
    """TRL packs ftkit's pre-tokenised rows as they are: every packed segment is one of ftkit's samples with its
    labels (assistant tokens only), each sample exactly once."""
    from accelerate import PartialState

    from ftkit.config.precision import CPU, training_precision
    from ftkit.data.pipeline import build_datasets
    from ftkit.train.model import load_tokenizer
    from ftkit.train.run import build_trainer, prepare_model

    recipe = load_recipe(make_recipe(tmp_path, tiny_model, "masks", packing=True))
    precision = training_precision(recipe.model, recipe.sft, CPU)
    tokenizer, chat_format, added = load_tokenizer(recipe.model, None, **QUIET)
    data = build_datasets(recipe, chat_format, use_cache=False, **QUIET)
    model = prepare_model(recipe, precision, tokenizer, bool(added), data, 0, **QUIET)
    trainer, *_ = build_trainer(recipe, model, tokenizer, precision, PartialState(cpu=True), tmp_path / "out",
                                data, **QUIET)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # all 7 samples in one row
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
    segments = sorted((batch["input_ids"][0, a:b].tolist(), batch["labels"][0, a:b].tolist())
                      for a, b in zip(starts, starts[1:]))
    assert segments == sorted((row["input_ids"], row["labels"]) for row in data.train)


@pytest.mark.slow
@pytest.mark.parametrize("option", ["packing", "padding_free"])
def test_packed_training_memorises_and_matches_the_padded_run(option, tiny_model, tmp_path, trained_run):
    """`ftkit train` with packing (or padding_free) on sdpa: the loss curve is the padded run's (same samples in
    every step) and the model answers every conversation."""
    recipe = make_recipe(tmp_path, tiny_model, option, **{option: True})
    result = ftkit("train", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ftkit's varlen sdpa" in (tmp_path / option / "train.log").read_text()
    from ftkit.inference.loading import load_for_chat

    model, _, chat_format = load_for_chat(tmp_path / option, None, None, None)
    assert_memorised(model, chat_format)
    curve = json.loads((tmp_path / option / "train_summary.json").read_text())["train_losses"]
    padded = json.loads((trained_run / "train_summary.json").read_text())["train_losses"]
    assert [step for step, _ in curve] == [step for step, _ in padded]
    assert [loss for _, loss in curve] == pytest.approx([loss for _, loss in padded], rel=1e-3)


def test_probe_tells_isolating_models_from_leaking_ones(tiny_model, tiny_opt):
    from transformers import AutoModelForCausalLM

    from ftkit.train.packing import leaks_across_samples

    for impl in ("sdpa", "eager"):
        assert leaks_across_samples(AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=impl)) is False
        assert leaks_across_samples(AutoModelForCausalLM.from_pretrained(tiny_opt, attn_implementation=impl)) is True


def test_train_refuses_packing_on_an_architecture_that_leaks(tiny_opt, tmp_path):
    """Caught before the run directory is claimed: nothing is written, and the recipe can be fixed and rerun."""
    recipe = make_recipe(tmp_path, tiny_opt, "opt", packing=True, lora_modules_to_save=None)
    result = ftkit("train", str(recipe))
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"ftkit: error: {recipe}: 'packing': opt models with attn_implementation sdpa let a packed sample attend "
        "to the samples before it in the row; set packing: false")
    assert "Traceback" not in result.stderr and not (tmp_path / "opt").exists()


@pytest.mark.parametrize("attn", [None, "sdpa", "eager", "flex_attention", "flash_attention_2",
                                  "kernels-community/flash-attn3"])
def test_packing_is_accepted_on_kernels_that_keep_sequences_apart(attn, tiny_model, tmp_path):
    for option in ("packing", "padding_free"):
        recipe = load_recipe(make_recipe(tmp_path, tiny_model, "packed", attn_implementation=attn, **{option: True}))
        assert recipe.sft[option] is True


@pytest.mark.parametrize("overrides,key,message", [
    ({"packing": True, "packing_strategy": "wrapped"}, "packing_strategy",
     "'wrapped' joins samples into rows where each attends to the ones before it, on every attention kernel; "
     "use bfd (or bfd_split)"),
    ({"padding_free": True, "attn_implementation": "paged|eager"}, "padding_free",
     "padding_free: true puts several samples in one row, and attn_implementation 'paged|eager' would let them "
     "attend to each other; use sdpa, eager, flex_attention or flash_attention_2, or set padding_free: false"),
])
def test_validate_refuses_packing_that_leaks(overrides, key, message, tiny_model, tmp_path):
    path = make_recipe(tmp_path, tiny_model, "bad", **overrides)
    result = ftkit("validate", str(path))
    assert result.returncode == 2
    assert result.stderr == f"ftkit: error: {path}:{line_of(path, key)}: '{key}': {message}\n"


@pytest.mark.parametrize("old,new", [("ffd", "bfd"), ("bfd-requeue", "bfd_split")])
def test_older_packing_strategy_names_are_renamed_with_a_note(old, new, tiny_model, tmp_path):
    """alignment-handbook's SmolLM3 recipes say packing_strategy: ffd, older TRL's name for bfd."""
    path = make_recipe(tmp_path, tiny_model, "old", packing=True, packing_strategy=old)
    recipe = load_recipe(path)
    assert recipe.sft["packing_strategy"] == new
    line = line_of(path, "packing_strategy")
    assert recipe.notes == [f"{path}:{line}: packing_strategy '{old}' is older TRL's name; renamed to '{new}'"]
