"""Loss masks are exact on many model families' chat templates: trained tokens are the assistant
contents plus their end-of-turn token, token for token, and nothing else."""

from __future__ import annotations

import pytest

from ftkit.config.arguments import ModelArguments
from ftkit.config.templates import BUILTIN_TEMPLATES
from ftkit.data.chat_format import ChatFormat
from ftkit.train.model import load_tokenizer
from tests.helpers import trained_runs

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of Ftkitland?"},
    {"role": "assistant", "content": "Tinyville."},
    {"role": "user", "content": "床前明月光，"},
    {"role": "assistant", "content": "疑是地上霜。"},
]
# Each family: its special tokens, and the exact text expected to carry loss for each assistant turn.
FAMILIES = {
    "chatml": ({}, ["Tinyville.<|im_end|>", "疑是地上霜。<|im_end|>"]),
    "llama3": ({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": None},
               ["Tinyville.<|eot_id|>", "疑是地上霜。<|eot_id|>"]),
    "gemma": ({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"},
              ["Tinyville.<end_of_turn>", "疑是地上霜。<end_of_turn>"]),
    "llama2": ({"bos_token": "<s>", "eos_token": "</s>", "pad_token": None},
               [" Tinyville. </s>", " 疑是地上霜。 </s>"]),
    "alpaca": ({"eos_token": "</s>", "pad_token": None}, ["Tinyville.</s>", "疑是地上霜。</s>"]),
}


def family_tokenizer(tiny_model, family: str):
    """The tiny tokenizer dressed as another family: its bos/eos/pad, template tokens it lacks added."""
    from transformers import AutoTokenizer

    specials, _ = FAMILIES[family]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    for name, token in specials.items():
        if token is not None:
            tokenizer.add_special_tokens({name: token})
        else:
            setattr(tokenizer, name, None)
    return tokenizer


@pytest.mark.parametrize("family", list(FAMILIES))
def test_trained_tokens_are_exactly_answers_and_end_of_turn(tiny_model, tmp_path, family):
    tokenizer = family_tokenizer(tiny_model, family)
    tokenizer.save_pretrained(tmp_path)
    args = ModelArguments(model_name_or_path=str(tmp_path))
    tokenizer, chat_format, _ = load_tokenizer(args, family, log=lambda *_: None)
    [encoded] = chat_format.encode(CONVERSATION)
    runs = trained_runs(encoded.input_ids, encoded.labels)
    _, expected = FAMILIES[family]
    assert [tokenizer.decode(run) for run in runs] == expected
    # token for token: each trained run is the tokenisation of the expected text on its own
    assert runs == [tokenizer.encode(text, add_special_tokens=False) for text in expected]
    # and the whole sequence is exactly the rendered conversation
    assert tokenizer.decode(encoded.input_ids) == chat_format.render(CONVERSATION)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_prompt_is_the_training_prefix(tiny_model, tmp_path, family):
    """What chat sends before an answer is token-for-token what training had before it."""
    tokenizer = family_tokenizer(tiny_model, family)
    tokenizer.save_pretrained(tmp_path)
    tokenizer, chat_format, _ = load_tokenizer(ModelArguments(model_name_or_path=str(tmp_path)), family, log=lambda *_: None)
    [encoded] = chat_format.encode(CONVERSATION)
    prompt_ids = tokenizer.encode(chat_format.prompt(CONVERSATION[:4]), add_special_tokens=False)
    first_trained_of_turn_2 = [i for i, label in enumerate(encoded.labels) if label != -100][-len(
        trained_runs(encoded.input_ids, encoded.labels)[-1])]
    assert encoded.input_ids[:first_trained_of_turn_2] == prompt_ids


def test_end_of_turn_detected_even_when_it_is_not_eos(tiny_model, tmp_path):
    tokenizer = family_tokenizer(tiny_model, "llama3")
    tokenizer.save_pretrained(tmp_path)
    tokenizer, chat_format, added = load_tokenizer(ModelArguments(model_name_or_path=str(tmp_path)), "llama3",
                                                   log=lambda *_: None)
    assert chat_format.end_of_turn == "<|eot_id|>" and tokenizer.eos_token == "<|end_of_text|>"
    assert chat_format.stop_strings() == ["<|eot_id|>", "<|end_of_text|>"]
    assert set(added) == {"<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"}
    # no pad token before: a distinct one was added, neither eos nor end-of-turn
    assert tokenizer.pad_token not in (None, tokenizer.eos_token, "<|eot_id|>")


def test_template_without_system_role_folds_system_into_first_user_turn(tiny_model, tmp_path):
    tokenizer = family_tokenizer(tiny_model, "gemma")
    tokenizer.save_pretrained(tmp_path)
    _, chat_format, _ = load_tokenizer(ModelArguments(model_name_or_path=str(tmp_path)), "gemma", log=lambda *_: None)
    assert not chat_format.supports_system
    assert "<start_of_turn>user\nBe brief.\n\nWhat is the capital" in chat_format.render(CONVERSATION)


@pytest.mark.parametrize("train_on, expected", [
    ("last_assistant", ["疑是地上霜。<|im_end|>"]),
    ("all", None),
])
def test_train_on_options(tiny_model, train_on, expected):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    chat_format = ChatFormat(tokenizer, BUILTIN_TEMPLATES["chatml"])
    [encoded] = chat_format.encode(CONVERSATION, train_on)
    if expected is None:
        assert encoded.labels == encoded.input_ids
    else:
        assert [tokenizer.decode(r) for r in trained_runs(encoded.input_ids, encoded.labels)] == expected


def test_new_token_rows_start_at_the_mean_and_ids_are_checked(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftkit.errors import FtkitError
    from ftkit.train.model import fit_embeddings
    from ftkit.train.run import check_token_ids

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    old = model.get_input_embeddings().weight.detach().clone()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|new_a|>", "<|new_b|>"]})
    assert fit_embeddings(model, tokenizer, log=lambda *_: None)
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == len(tokenizer) == old.shape[0] + 2
    assert torch.allclose(weight[-1], old.mean(dim=0)) and torch.equal(weight[: old.shape[0]], old)
    assert model.get_output_embeddings().weight.shape[0] == len(tokenizer)
    assert not fit_embeddings(model, tokenizer, log=lambda *_: None)  # nothing to do the second time
    with pytest.raises(FtkitError, match=r"token id 5000 is outside the model's embedding matrix \(1026 rows\)"):
        check_token_ids({"input_ids": [[1, 2], [5000]]}, model)


def test_a_broken_template_file_is_one_clear_error(tiny_model, tmp_path):
    from ftkit.errors import FtkitError

    template = tmp_path / "broken.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfo %}")
    with pytest.raises(FtkitError, match=r"^the chat template .broken.jinja. cannot render a user/assistant exchange: "
                                         r"TemplateSyntaxError: "):
        load_tokenizer(ModelArguments(model_name_or_path=str(tiny_model)), str(template), log=lambda *_: None)
