"""Correctness guards: the model learns to stop, caches never go stale, gradient accumulation is exact,
the same seed gives the same run, and every run shows before/after answers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from ftkit.config.recipe import load_recipe
from ftkit.train.run import run_training
from tests.helpers import ftkit, write_jsonl
from tests.helpers import CHATS, SYSTEM, make_recipe

QUIET = lambda *_: None  # noqa: E731


def train(recipe_path: Path, use_cache: bool = True, **overrides) -> Path:
    recipe = load_recipe(recipe_path, overrides)
    return run_training(recipe, use_cache=use_cache, log=QUIET)


def dressed_model(tiny_model: Path, tmp_path: Path, name: str, **tokens) -> Path:
    """The tiny model with its tokenizer changed: special tokens set/removed, template dropped."""
    from transformers import AutoTokenizer

    out = tmp_path / name
    shutil.copytree(tiny_model, out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    for attr, value in tokens.items():
        if attr == "chat_template":
            tokenizer.chat_template = value
            (out / "chat_template.jinja").unlink(missing_ok=True)
        elif value is None:
            setattr(tokenizer, attr, None)
        else:
            tokenizer.add_special_tokens({attr: value})
    tokenizer.save_pretrained(out)
    return out


def chat_answers(out: Path, *extra: str) -> list[str]:
    answers = []
    for question, _ in CHATS[:3]:
        result = ftkit("chat", "--adapter", str(out), "--system", SYSTEM, "--prompt", question, "--greedy",
                       "--max-new-tokens", "200", *extra)
        assert result.returncode == 0, result.stderr[-2000:]
        answers.append(result.stdout)
    return answers


EXPECTED = [answer + "\n" for _, answer in CHATS[:3]]


@pytest.mark.slow
def test_llama3_style_end_of_turn_not_eos_and_no_pad_token(tiny_model, tmp_path):
    """<|eot_id|> ends turns, eos is <|end_of_text|>, no pad: the model stops exactly after each answer."""
    base = dressed_model(tiny_model, tmp_path, "llama3ish", bos_token="<|begin_of_text|>",
                         eos_token="<|end_of_text|>", pad_token=None)
    recipe = make_recipe(tmp_path, base, "run", chat_template="llama3", lora_modules_to_save=None, max_steps=200)
    out = train(recipe)
    saved = json.loads((out / "generation_config.json").read_text())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.convert_tokens_to_ids("<|eot_id|>") in saved["eos_token_id"]
    assert tokenizer.pad_token not in ("<|eot_id|>", "<|end_of_text|>", None)
    from safetensors import safe_open

    with safe_open(out / "adapter_model.safetensors", "pt") as f:  # new tokens' rows are trained and saved
        assert any("embed_tokens" in k for k in f.keys()) and any("lm_head" in k for k in f.keys())
    assert chat_answers(out) == EXPECTED


@pytest.mark.slow
def test_pad_equal_to_eos_and_end_of_turn_still_learns_to_stop(tiny_model, tmp_path):
    base = dressed_model(tiny_model, tmp_path, "padeos", eos_token="<|im_end|>", pad_token="<|im_end|>")
    out = train(make_recipe(tmp_path, base, "run"))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).pad_token not in ("<|im_end|>", None)
    assert chat_answers(out) == EXPECTED


@pytest.mark.slow
def test_base_model_without_template_learns_to_stop_at_eos(tiny_model, tmp_path):
    base = dressed_model(tiny_model, tmp_path, "base", chat_template=None)
    out = train(make_recipe(tmp_path, base, "run"))
    assert "### Response:" in (out / "chat_template.jinja").read_text()  # the built-in alpaca template
    assert chat_answers(out) == EXPECTED


def ga_rows() -> list[dict]:
    """Conversations of very different lengths, so per-micro-batch averaging would differ."""
    rows = []
    for i in range(8):
        answer = " ".join(["word"] * (1 + 12 * (i % 4))) + f" {i}"
        rows.append({"messages": [{"role": "user", "content": f"q{i} " + "x" * (3 * i)},
                                  {"role": "assistant", "content": answer}]})
    return rows


def ga_recipe(tmp_path: Path, tiny_model: Path, per_device: int, name: str, processes: int = 1) -> dict:
    data = write_jsonl(tmp_path / "ga.jsonl", ga_rows())
    return {"model_name_or_path": str(tiny_model), "use_peft": True, "lora_dropout": 0.0,
            "dataset_mixer": {str(data): 1.0}, "output_dir": str(tmp_path / name), "max_steps": 3,
            "per_device_train_batch_size": per_device, "gradient_accumulation_steps": 8 // per_device // processes,
            "learning_rate": 1e-3, "logging_steps": 1, "gradient_checkpointing": False, "save_strategy": "no",
            "seed": 1}


def ga_result(out: Path) -> tuple[dict, list]:
    from safetensors.torch import load_file

    summary = json.loads((out / "train_summary.json").read_text())
    return load_file(out / "adapter_model.safetensors"), summary["train_losses"]


def ga_run(tmp_path: Path, tiny_model: Path, per_device: int, name: str) -> tuple[dict, list]:
    raw = ga_recipe(tmp_path, tiny_model, per_device, name)
    return ga_result(run_training(load_recipe(None, raw=raw), use_cache=False, log=QUIET))


def max_relative_difference(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).abs().max() / (a[k].abs().max() + 1e-12)).item() for k in a)


def split_results(tmp_path, tiny_model):
    return {n: ga_run(tmp_path, tiny_model, n, f"bs{n}") for n in (8, 2, 1)}


@pytest.mark.slow
@pytest.mark.parametrize("path", ["native", "ftkit_fallback"])
def test_gradient_accumulation_is_exact(tiny_model, tmp_path, monkeypatch, path):
    """8x1, 2x4 and 1x8 give the same adapter weights and the same logged loss per step."""
    if path == "ftkit_fallback":  # a model whose forward takes no loss kwargs: ftkit's token-sum loss
        import transformers

        monkeypatch.setattr(transformers.LlamaForCausalLM, "accepts_loss_kwargs", False, raising=False)
    results = split_results(tmp_path, tiny_model)
    weights, losses = results[8]
    for n in (2, 1):
        assert max_relative_difference(weights, results[n][0]) < 1e-4
        assert [step for step, _ in results[n][1]] == [step for step, _ in losses]
        assert [loss for _, loss in results[n][1]] == pytest.approx([loss for _, loss in losses], rel=1e-4)


@pytest.mark.slow
@pytest.mark.xdist_group("port-29500")  # torchrun and accelerate default to the same port: one at a time
def test_two_processes_with_accumulation_match_one_process(tiny_model, tmp_path):
    """2 processes x 2 per device x 2 accumulation == 1 process x 8 (gloo on CPU, via torchrun)."""
    import subprocess
    import sys

    single = ga_run(tmp_path, tiny_model, 8, "single")
    recipe = tmp_path / "ddp.yml"
    recipe.write_text(yaml.safe_dump(ga_recipe(tmp_path, tiny_model, 2, "ddp", processes=2)), encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "ftkit",
                             "train", str(recipe), "--no-cache"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "effective batch size: 2 per device x 2 process(es) x 2 accumulation = 8" in result.stdout
    weights, losses = ga_result(tmp_path / "ddp")
    assert max_relative_difference(single[0], weights) < 1e-4
    assert [loss for _, loss in losses] == pytest.approx([loss for _, loss in single[1]], rel=1e-4)


@pytest.mark.slow
def test_without_the_fallback_accumulation_would_not_be_exact(tiny_model, tmp_path, monkeypatch):
    """Shows the guard above can fail: the same model with ftkit's fallback switched off diverges."""
    import transformers

    import ftkit.train.loss

    monkeypatch.setattr(transformers.LlamaForCausalLM, "accepts_loss_kwargs", False, raising=False)
    monkeypatch.setattr(ftkit.train.loss, "count_step_tokens", lambda trainer: False)
    results = split_results(tmp_path, tiny_model)
    assert max_relative_difference(results[8][0], results[1][0]) > 1e-3


@pytest.mark.slow
def test_a_model_without_loss_kwargs_costs_one_forward_per_step(tiny_model, tmp_path, monkeypatch):
    """The token-sum normalisation for such models must not buy a second forward per step (a compute_loss_func
    does, in TRL's SFTTrainer): 8 micro-batches, one forward each."""
    import transformers

    monkeypatch.setattr(transformers.LlamaForCausalLM, "accepts_loss_kwargs", False, raising=False)
    calls = []
    forward = transformers.LlamaModel.forward
    monkeypatch.setattr(transformers.LlamaModel, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    lines: list[str] = []
    run_training(load_recipe(None, raw=ga_recipe(tmp_path, tiny_model, 1, "one-forward")), use_cache=False,
                 log=lines.append)
    assert any("takes no loss kwargs" in line for line in lines), lines
    assert len(calls) == 3 * 8  # max_steps 3 x accumulation 8


@pytest.mark.slow
def test_same_seed_same_run(tiny_model, tmp_path):
    # batches of 2 and a 0.8 mixer weight: both the data order and the sampling show in the losses
    recipe = make_recipe(tmp_path, tiny_model, "first", max_steps=30, per_device_train_batch_size=2,
                         dataset_mixer={str(tmp_path / "chats.jsonl"): 0.8})
    first = json.loads((train(recipe, use_cache=False) / "train_summary.json").read_text())
    second = train(recipe, use_cache=False, output_dir=str(tmp_path / "second"))  # rebuilt, not cached, data
    second = json.loads((second / "train_summary.json").read_text())
    assert first["train_losses"] == second["train_losses"] and len(first["train_losses"]) == 3
    assert first["seed"] == second["seed"] and first["data"]["seed"] == second["data"]["seed"]


@pytest.mark.slow
def test_training_after_in_place_data_edit_learns_the_new_answers(tiny_model, tmp_path):
    from ftkit.inference.generate import generate
    from ftkit.inference.loading import load_for_chat
    from ftkit.inference.options import GenerationOptions

    old = [("Pick a colour.", "Red, said the fox."), ("Pick a number.", "Seven, said the owl.")]
    new = [("Pick a colour.", "Tan, said the cat."), ("Pick a number.", "Three, said the owl.")]
    data = tmp_path / "edit.jsonl"

    def run(pairs, name):
        write_jsonl(data, [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                           for q, a in pairs])
        return train(make_recipe(tmp_path, tiny_model, name, dataset_mixer={str(data): 1.0}))

    run(old, "old")
    size = data.stat().st_size
    out = run(new, "new")
    assert data.stat().st_size == size  # rewritten in place with answers of the same length
    model, _, chat_format = load_for_chat(out, None, None, None)
    for question, answer in new:
        assert generate(model, chat_format, [{"role": "user", "content": question}],
                        GenerationOptions(max_new_tokens=50, greedy=True)) == answer


@pytest.mark.slow
def test_eval_samples_show_before_and_after(tiny_model, tmp_path):
    from tests.helpers import rows

    write_jsonl(tmp_path / "twice.jsonl", rows() + rows())  # every eval row also appears in training
    recipe = make_recipe(tmp_path, tiny_model, "samples", dataset_mixer={str(tmp_path / "twice.jsonl"): 1.0},
                         test_split_size=2, eval_samples_max_new_tokens=40)
    out = train(recipe)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["eval_samples"]["count"] == 2
    assert summary["eval_samples"]["before"]["exact_match"] == 0.0
    assert summary["eval_samples"]["after"]["exact_match"] == 1.0
    text = (out / "samples.md").read_text()
    assert text.count("**reference**") == 2 and text.count("**before**") == 2 and text.count("**after**") == 2


@pytest.mark.slow
def test_non_finite_loss_stops_the_run_and_saves_nothing(tiny_model, tmp_path):
    recipe = make_recipe(tmp_path, tiny_model, "exploding", learning_rate=1e30, max_steps=200, logging_steps=1,
                         max_grad_norm=0.0)
    result = ftkit("train", str(recipe))
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ftkit: error: training loss became ") and "no model was saved" in last
    step = int(last.split(" at step ")[1].split(";")[0])
    assert step < 200
    assert not (tmp_path / "exploding" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "exploding" / "train_summary.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["nll", "chunked_nll", "dft"])
def test_first_logged_loss_is_the_hand_computed_loss_on_ftkit_masks(tiny_model, tmp_path, loss_type):
    """TRL's loss types (its fused LM head, `dft`'s probability weighting) see exactly ftkit's labels: the first
    logged loss equals the loss computed here from the untrained model's logits over the assistant tokens only,
    normalised by their count over the whole batch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftkit.data.chat_format import ChatFormat
    from tests.helpers import rows

    recipe = make_recipe(tmp_path, tiny_model, loss_type, loss_type=loss_type, max_steps=1, logging_steps=1,
                         learning_rate=1e-9, lora_modules_to_save=None)
    summary = json.loads((train(recipe, use_cache=False) / "train_summary.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    chat_format = ChatFormat(tokenizer, tokenizer.chat_template)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    total, count = 0.0, 0
    for row in rows():
        [encoded] = chat_format.encode(row["messages"])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([encoded.input_ids])).logits[0, :-1]
        labels = torch.tensor(encoded.labels[1:])
        logp = torch.log_softmax(logits.float(), -1)[labels != -100].gather(1, labels[labels != -100, None])[:, 0]
        total += float(-(logp.exp() * logp).sum() if loss_type == "dft" else -logp.sum())
        count += int((labels != -100).sum())
    assert summary["train_losses"][0][1] == pytest.approx(total / count, rel=1e-4)
