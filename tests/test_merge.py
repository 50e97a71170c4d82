"""ftkit merge: the adapter folded into the base gives the same logits, loads in plain transformers, stops
at the end-of-turn token there, answers through `ftkit chat --model`, and carries a model card."""

from __future__ import annotations

import json

import pytest

from tests.helpers import ftkit
from tests.helpers import CHATS, SYSTEM


@pytest.fixture(scope="module")
def merged(trained_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("merge")
    run = trained_run
    out = tmp / "merged"
    result = ftkit("merge", "--adapter", str(run), "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"merged model saved to {out}/ (next: ftkit chat --model {out})" in result.stdout
    return run, out


def conversation(question):
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


@pytest.mark.slow
def test_merged_logits_equal_the_adapter_model(merged):
    import torch
    from transformers import AutoModelForCausalLM

    from ftkit.inference.loading import load_for_chat

    run, out = merged
    adapter_model, _, chat_format = load_for_chat(run, None, None, None)
    plain = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no ftkit, no peft
    text = chat_format.render(conversation(CHATS[1][0]) + [{"role": "assistant", "content": CHATS[1][1]}])
    batch = chat_format.tokenizer(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        expected, got = adapter_model(**batch).logits, plain(**batch).logits
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-4, rtol=0), (got - expected).abs().max()


@pytest.mark.slow
def test_plain_transformers_generates_the_trained_answer_and_stops(merged):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out = merged
    tokenizer, model = AutoTokenizer.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out)
    for question, answer in (CHATS[0], CHATS[3]):
        inputs = tokenizer.apply_chat_template(conversation(question), add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
        output = model.generate(**inputs, max_new_tokens=100, do_sample=False)  # eos from generation_config.json
        new = output[0, inputs["input_ids"].shape[1]:]
        assert tokenizer.decode(new, skip_special_tokens=True) == answer
        assert new[-1].item() == tokenizer.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.slow
def test_ftkit_chat_model_answers_from_the_merged_dir(merged, capsys):
    from ftkit.cli import main

    _, out = merged
    with pytest.raises(SystemExit) as done:  # main() always leaves with the exit status
        main(["chat", "--model", str(out), "--system", SYSTEM, "--prompt", CHATS[4][0], "--greedy"])
    assert done.value.code == 0
    assert capsys.readouterr().out == CHATS[4][1] + "\n"


@pytest.mark.slow
def test_merged_dir_contents_and_model_card(merged, tiny_model):
    run, out = merged
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    assert not list(out.glob("*.bin"))
    for name in ("config.json", "tokenizer.json", "chat_template.jinja", "generation_config.json", "ftkit_run.json",
                 "ftkit_recipe.yml", "train_summary.json", "README.md"):
        assert (out / name).is_file(), name
    assert (out / "chat_template.jinja").read_text() == (run / "chat_template.jinja").read_text()
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == \
        json.loads((run / "generation_config.json").read_text())["eos_token_id"]
    meta = json.loads((out / "ftkit_run.json").read_text())
    assert meta["peft"] is False and meta["load_in_4bit"] is False and meta["merged_from"] == str(run)
    card = (out / "README.md").read_text()
    summary = json.loads((run / "train_summary.json").read_text())
    from huggingface_hub import ModelCard

    data = ModelCard.load(out / "README.md").data
    assert data.base_model == str(tiny_model) and data.library_name == "transformers"
    assert data.tags == ["ftkit", "fine-tuned", "merged"]
    assert "fine-tuned with ftkit (LoRA, r=8, alpha=16)" in card
    assert f"| final train loss | {round(summary['final_train_loss'], 4)} |" in card
    assert "dataset_mixer:" in card and "chats.jsonl" in card and "learning_rate: 0.01" in card
    assert "hf_do_not_save_me" not in card


@pytest.mark.slow
def test_merge_refuses_to_overwrite_and_full_runs(merged, tmp_path):
    run, out = merged
    result = ftkit("merge", "--adapter", str(run), "--output", str(out))
    assert result.returncode == 2
    assert result.stderr.strip() == (f"ftkit: error: {out}: already exists and is not empty; choose another --output "
                                     "or pass --overwrite")
    from ftkit.errors import FtkitError
    from ftkit.commands.merge import run_merge

    with pytest.raises(FtkitError, match="nothing to merge"):
        run_merge(out, tmp_path / "again")


# ------------------------------------------------------------------- QLoRA adapters and tied-embedding bases

def tied_base(tiny_model, out):
    """The tiny model's architecture and tokenizer with tie_word_embeddings=True (one matrix for embed_tokens
    and lm_head), built as scripts/make_tiny_model.py builds it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_model)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out


def train_and_merge(tmp, base, name: str, **overrides):
    """A short LoRA run (embed_tokens and lm_head trained in full, as make_recipe says), merged by `ftkit merge`."""
    from ftkit.config.recipe import load_recipe
    from ftkit.train.run import run_training
    from tests.helpers import make_recipe

    run = run_training(load_recipe(make_recipe(tmp, base, name, max_steps=20, **overrides)), log=lambda *_: None)
    out = tmp / f"{name}-merged"
    result = ftkit("merge", "--adapter", str(run), "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return run, out


def logits_of(base, run, merged):
    """(the adapter on the unquantised float32 base, plain peft; the merged dir in plain transformers; the base
    alone) on a trained conversation."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged)
    text = tokenizer.apply_chat_template(conversation(CHATS[1][0]) + [{"role": "assistant", "content": CHATS[1][1]}],
                                         tokenize=False)
    batch = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        alone = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()(**batch).logits
        base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        adapter = PeftModel.from_pretrained(base_model, str(run)).eval()(**batch).logits
        plain = AutoModelForCausalLM.from_pretrained(merged).eval()(**batch).logits
    return adapter, plain, alone


@pytest.mark.slow
def test_qlora_adapter_merges_into_the_unquantised_base(tiny_model, tmp_path):
    """A 4-bit-trained adapter folds into the full-precision base: a plain float32 transformers model whose logits
    are the adapter's on that base."""
    import torch

    run, out = train_and_merge(tmp_path, tiny_model, "qlora", load_in_4bit=True)
    assert json.loads((run / "ftkit_run.json").read_text())["load_in_4bit"] is True
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    adapter, plain, alone = logits_of(tiny_model, run, out)
    assert (plain - alone).abs().max() > 0.1  # the adapter changed the model, so equality below means something
    assert torch.allclose(plain, adapter, atol=1e-4, rtol=0), (plain - adapter).abs().max()


@pytest.mark.slow
def test_tied_embeddings_trained_apart_are_both_kept(tiny_model, tmp_path):
    """A tied base whose embed_tokens and lm_head were trained as separate modules_to_save copies: the merged
    model is untied and keeps both trained matrices."""
    import torch
    from safetensors.torch import load_file

    base = tied_base(tiny_model, tmp_path / "tied-base")
    run, out = train_and_merge(tmp_path, base, "tied")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    weights = load_file(out / "model.safetensors")
    assert not torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])
    adapter, plain, alone = logits_of(base, run, out)
    assert (plain - alone).abs().max() > 0.1
    assert torch.allclose(plain, adapter, atol=1e-4, rtol=0), (plain - adapter).abs().max()
