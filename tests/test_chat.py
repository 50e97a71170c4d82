"""ftkit chat: the REPL's slash commands and history through piped stdin, tokens streamed as whole
characters, decoding options, and how a quantised run's base is loaded."""

from __future__ import annotations

import json

import pytest

from ftkit.inference.generate import char_streamer, generate, generation_kwargs

from ftkit.inference.loading import load_for_chat, quantization_for

from ftkit.inference.options import GenerationOptions
from ftkit.errors import FtkitError
from tests.helpers import ROOT
from tests.helpers import CHATS, GREEDY, MULTI_TURN, SYSTEM


def ftkit_piped(*args: str, stdin: str):
    """The real console entry point with stdin piped, as a script would run it."""
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "ftkit", *args], cwd=ROOT, input=stdin, capture_output=True,
                          text=True, env=dict(os.environ), timeout=600)


@pytest.fixture(scope="module")
def run_dir(trained_run):
    return trained_run


@pytest.mark.slow
def test_repl_history_and_slash_commands_through_piped_stdin(run_dir):
    (q1, a1), (q2, a2) = MULTI_TURN
    question, answer = CHATS[3]
    script = "\n".join([
        f"/system {SYSTEM}",
        q1, q2,  # the second answer needs the first turn in the history
        "/params", "/reset",
        "/set max_new_tokens=3", CHATS[0][0],  # cut short: the setting took effect
        "/set max_new_tokens=200", "/set nonsense=1", "/set top_k=many",
        "/reset", question,
        "/exit", CHATS[1][0],  # never answered
    ]) + "\n"
    result = ftkit_piped("chat", "--adapter", str(run_dir), "--greedy", "--max-new-tokens", "200", stdin=script)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 4, result.stdout
    assert lines[0] == a1 and lines[1] == a2 and lines[3] == answer
    assert lines[2] and CHATS[0][1].startswith(lines[2]) and len(lines[2]) < len(CHATS[0][1])
    assert "max_new_tokens=200 temperature=0.7" in result.stderr and f"system: {SYSTEM}" in result.stderr
    assert "usage: /set NAME=VALUE" in result.stderr and "top_k: 'many' is not a valid int" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_streamed_pieces_are_the_answer(run_dir):
    model, _, chat_format = load_for_chat(run_dir, None, None, None)
    for question, answer in (CHATS[3], CHATS[1]):
        pieces = []
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        text = generate(model, chat_format, messages, GREEDY, streamer=char_streamer(chat_format.tokenizer, pieces.append))
        assert text == answer and "".join(pieces) == answer and len(pieces) > 2
    sampled = GenerationOptions(max_new_tokens=20, temperature=0.8, top_k=5, no_repeat_ngram_size=2, seed=1)
    messages = [{"role": "user", "content": CHATS[0][0]}]
    assert generate(model, chat_format, messages, sampled) == generate(model, chat_format, messages, sampled)


def test_streamer_holds_back_partial_characters(tiny_model):
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    text = "疑是地上霜 🌙 Zorb has three moons: 佐布星"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # some tokens end mid-character
    pieces = []
    streamer = char_streamer(tokenizer, pieces.append)
    streamer.put(torch.tensor([[1, 2, 3]]))  # the prompt: skipped
    for i in ids + [tokenizer.convert_tokens_to_ids("<|im_end|>")]:
        streamer.put(torch.tensor([i]))
    streamer.end()
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces) and len(pieces) > 5


def test_set_parses_each_option():
    options = GenerationOptions()
    for assignment in ("temperature=0.5", "top_k=7", "no-repeat-ngram-size=3", "greedy=true", "seed=4",
                       "max_new_tokens=12", "seed=none"):
        options.set(assignment)
    assert (options.temperature, options.top_k, options.no_repeat_ngram_size, options.greedy, options.seed,
            options.max_new_tokens) == (0.5, 7, 3, True, None, 12)
    for bad in ("temperature", "colour=red", "top_k=1.5", "greedy=maybe", "top_p=2", "max_new_tokens=0"):
        with pytest.raises(FtkitError):
            GenerationOptions().set(bad)


def test_generation_kwargs_stop_at_end_of_turn(tiny_model):
    from transformers import AutoTokenizer

    from ftkit.data.chat_format import ChatFormat

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    chat_format = ChatFormat(tokenizer, tokenizer.chat_template)
    sampled = generation_kwargs(chat_format, GenerationOptions(top_k=5, no_repeat_ngram_size=3, temperature=0.3))
    assert sampled["eos_token_id"][0] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert sampled["do_sample"] and sampled["top_k"] == 5 and sampled["no_repeat_ngram_size"] == 3
    assert not generation_kwargs(chat_format, GenerationOptions(temperature=0))["do_sample"]  # 0 means greedy


def test_quantised_run_loads_in_4bit_on_gpu_only():
    import torch

    meta = {"load_in_4bit": True}
    assert quantization_for(meta, cuda=False, dtype=None, torch_dtype=torch.float32) is None  # CPU: float32
    assert quantization_for(meta, cuda=True, dtype="bfloat16", torch_dtype=torch.bfloat16) is None  # --dtype wins
    quant = quantization_for(meta, cuda=True, dtype=None, torch_dtype=torch.bfloat16)
    assert quant.load_in_4bit and quant.bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_for({"load_in_8bit": True}, cuda=True, dtype="auto", torch_dtype=torch.float16).load_in_8bit
    assert quantization_for({}, cuda=True, dtype=None, torch_dtype=torch.bfloat16) is None


def test_a_run_reloads_with_the_quantisation_it_was_trained_with(trained_run):
    """ftkit_run.json records the recipe's 4-bit settings; an fp4 nested-quant run is not reloaded as nf4."""
    import torch

    from ftkit.config import quantization
    from ftkit.config.arguments import ModelArguments

    recipe = ModelArguments(model_name_or_path="x", use_peft=True, load_in_4bit=True, bnb_4bit_quant_type="fp4",
                            use_bnb_nested_quant=True, bnb_4bit_quant_storage="bfloat16")
    meta = {"load_in_4bit": True, "quantization": quantization.settings(recipe)}
    quant = quantization_for(meta, cuda=True, dtype=None, torch_dtype=torch.bfloat16)
    assert (quant.bnb_4bit_quant_type, quant.bnb_4bit_use_double_quant) == ("fp4", True)
    assert quant.bnb_4bit_quant_storage == torch.bfloat16 and quant.bnb_4bit_compute_dtype == torch.bfloat16
    saved = json.loads((trained_run / "ftkit_run.json").read_text())
    assert saved["quantization"] is None and saved["load_in_4bit"] is False  # what a LoRA run records


def test_missing_run_is_one_line_exit_2(tmp_path, capsys):
    from ftkit.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["chat", "--adapter", str(tmp_path / "nope"), "--prompt", "hi"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == f"ftkit: error: {tmp_path / 'nope'}: no such directory"


@pytest.mark.slow
def test_chat_uses_the_system_prompt_the_run_was_trained_with(tiny_model, tmp_path):
    """A recipe-level system_prompt is part of every trained sample; chat adds it unless told otherwise."""
    from tests.helpers import ftkit as run_ftkit
    from tests.helpers import CHATS, make_recipe

    recipe = make_recipe(tmp_path, tiny_model, "sys-run", system_prompt="Answer like a lighthouse keeper.")
    rows = [json.loads(line) for line in (tmp_path / "chats.jsonl").read_text().splitlines()]
    for row in rows:  # drop the rows' own system turns: the recipe's system_prompt is the only one
        row["messages"] = [m for m in row["messages"] if m["role"] != "system"]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    assert run_ftkit("train", str(recipe)).returncode == 0
    question, answer = CHATS[0]
    result = run_ftkit("chat", "--adapter", str(tmp_path / "sys-run"), "--prompt", question, "--greedy", "--no-stream")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == answer + "\n"
