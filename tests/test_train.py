"""End to end: a recipe trains the tiny model until it has memorised its conversations, and the
result answers them exactly through the chat template (LoRA and full fine-tuning)."""

from __future__ import annotations

import hashlib
import json

import pytest

from ftkit.config.recipe import load_recipe
from ftkit.inference.loading import load_for_chat
from ftkit.inference.generate import generate
from tests.helpers import CHATS, GREEDY, SYSTEM, assert_memorised, ftkit, loss_curve_points, make_recipe, write_jsonl

@pytest.fixture(scope="module")
def lora_run(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    recipe = make_recipe(tmp, tiny_model, "lora-run")
    result = ftkit("train", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "lora-run", result, recipe


@pytest.mark.slow
def test_lora_run_memorises_and_chat_cli_answers(lora_run):
    out, result, _ = lora_run
    assert f"next: ftkit chat --adapter {out}" in result.stdout
    model, _, chat_format = load_for_chat(out, None, None, None)
    assert_memorised(model, chat_format)
    question, answer = CHATS[3]
    chat = ftkit("chat", "--adapter", str(out), "--system", SYSTEM, "--prompt", question, "--greedy",
                 "--max-new-tokens", "200")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout == answer + "\n"  # only the answer: nothing after the end-of-turn token


@pytest.mark.slow
def test_lora_run_artifacts(lora_run, tiny_model):
    out, _, _ = lora_run
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "chat_template.jinja",
                 "generation_config.json", "ftkit_recipe.yml", "ftkit_run.json", "train_summary.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.bin")) or [p.name for p in out.glob("*.bin")] == ["training_args.bin"]
    summary = json.loads((out / "train_summary.json").read_text())
    losses = [loss for _, loss in summary["train_losses"]]
    curve = loss_curve_points(out / "loss_curve.svg")  # one point per logged loss; SVG y grows downward
    assert len(curve) == len(losses) and curve[-1][1] > curve[0][1]
    assert summary["global_step"] == 150
    assert summary["final_train_loss"] < 0.1 * summary["first_train_loss"]
    assert summary["tokens_seen"] > 0 and summary["tokens_per_second"] > 0 and summary["peak_memory_mb"] > 0
    assert summary["data"]["train_rows"] == len(CHATS) + 1
    assert summary["data"]["trained_tokens"] > 0
    eos_ids = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in eos_ids
    saved = (out / "ftkit_recipe.yml").read_text()
    assert "hf_do_not_save_me" not in saved and "hub_token" not in saved
    again = load_recipe(out / "ftkit_recipe.yml")
    assert again.model.model_name_or_path == str(tiny_model) and again.sft["max_steps"] == 150


@pytest.mark.slow
def test_refuses_to_overwrite_a_finished_run(lora_run):
    out, _, recipe = lora_run
    before = hashlib.sha256((out / "adapter_model.safetensors").read_bytes()).hexdigest()
    result = ftkit("train", str(recipe), "--set", "max_steps=1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"ftkit: error: output_dir '{out}' already holds a finished run; choose another output_dir, "
        "or set overwrite_output_dir: true to replace it")
    assert hashlib.sha256((out / "adapter_model.safetensors").read_bytes()).hexdigest() == before


@pytest.mark.slow
def test_full_fine_tune_memorises(tiny_model, tmp_path):
    from ftkit.cli import main

    recipe = make_recipe(tmp_path, tiny_model, "full-run", use_peft=False, learning_rate=3e-3)
    with pytest.raises(SystemExit) as done:  # main() always leaves with the exit status
        main(["train", str(recipe)])
    assert done.value.code == 0
    out = tmp_path / "full-run"
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    model, _, chat_format = load_for_chat(None, out, None, None)
    assert_memorised(model, chat_format)


@pytest.mark.slow
def test_every_format_trains_end_to_end_from_the_cli(tiny_model, tmp_path):
    """One recipe mixing all five formats; each source's answers come back exactly."""
    d = tmp_path
    write_jsonl(d / "openai.jsonl", [{"messages": [{"role": "user", "content": "Colour of Zorb's sky?"},
                                                  {"role": "assistant", "content": "Green at noon."}]}])
    write_jsonl(d / "sharegpt.jsonl", [{"conversations": [{"from": "human", "value": "Name Zorb's moons."},
                                                         {"from": "gpt", "value": "Pim, Pom and Pum."}]}])
    (d / "alpaca.json").write_text(json.dumps([{"instruction": "請續寫：", "input": "春眠不覺曉，",
                                                "output": "處處聞啼鳥。"}], ensure_ascii=False), encoding="utf-8")
    (d / "qa.csv").write_text("question,answer\nWho guards Byte Island?,A sleepy orange cat.\n", encoding="utf-8")
    write_jsonl(d / "notes.jsonl", [{"body": "Ftkit fact: Tinyville sits on the Gradient River."}])
    mixture = [{"id": str(d / "openai.jsonl")}, {"id": str(d / "sharegpt.jsonl")}, {"id": str(d / "alpaca.json")},
               {"id": str(d / "qa.csv"), "columns": {"question": "prompt", "answer": "completion"}},
               {"id": str(d / "notes.jsonl"), "columns": {"body": "text"}, "format": "text"}]
    recipe = make_recipe(tmp_path, tiny_model, "formats", dataset_mixer=None, dataset_mixture=mixture,
                         per_device_train_batch_size=5, max_steps=120)
    result = ftkit("train", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    model, _, chat_format = load_for_chat(tmp_path / "formats", None, None, None)
    for question, answer in [("Colour of Zorb's sky?", "Green at noon."), ("Name Zorb's moons.", "Pim, Pom and Pum."),
                             ("請續寫：\n春眠不覺曉，", "處處聞啼鳥。"), ("Who guards Byte Island?", "A sleepy orange cat.")]:
        assert generate(model, chat_format, [{"role": "user", "content": question}], GREEDY) == answer
    tokenizer = chat_format.tokenizer
    prefix = tokenizer("Ftkit fact: Tinyville sits on the", return_tensors="pt")
    out = model.generate(**prefix, max_new_tokens=12, do_sample=False)
    assert tokenizer.decode(out[0, prefix["input_ids"].shape[1]:]).startswith(" Gradient River.")


@pytest.mark.slow
def test_streaming_trains_to_memorisation(tiny_model, tmp_path):
    from ftkit.train.run import run_training

    recipe = load_recipe(make_recipe(tmp_path, tiny_model, "streamed", streaming=True, max_steps=150))
    out = run_training(recipe, log=lambda *_: None)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == 150 and summary["data"]["cache"] == "streaming"
    model, _, chat_format = load_for_chat(out, None, None, None)
    assert_memorised(model, chat_format)


def test_streaming_needs_max_steps(tiny_model, tmp_path):
    result = ftkit("validate", str(make_recipe(tmp_path, tiny_model, "s", streaming=True, max_steps=-1)))
    assert result.returncode == 2
    assert "'streaming': a streamed dataset has no known length: set max_steps" in result.stderr


@pytest.mark.slow
def test_resume_from_checkpoint_continues_the_run(tiny_model, tmp_path):
    from ftkit.train.run import run_training

    recipe = make_recipe(tmp_path, tiny_model, "resumable", max_steps=20, save_strategy="steps", save_steps=10)
    out = run_training(load_recipe(recipe), log=lambda *_: None)
    assert (out / "checkpoint-20").is_dir()
    (out / "ftkit_run.json").unlink()  # killed during the final save: unfinished, so it may be resumed
    again = run_training(load_recipe(recipe, ["max_steps=30", "resume_from_checkpoint=true"]), log=lambda *_: None)
    summary = json.loads((again / "train_summary.json").read_text())
    assert summary["global_step"] == 30
    assert [step for step, _ in summary["train_losses"]] == [10, 20, 30]  # steps 1-20 came from the checkpoint


@pytest.mark.slow
def test_tensorboard_and_wandb_offline_without_a_key(tiny_model, tmp_path):
    recipe = make_recipe(tmp_path, tiny_model, "reported", max_steps=10, report_to=["tensorboard", "wandb"])
    result = ftkit("train", str(recipe), cwd=tmp_path, env={"HOME": str(tmp_path), "WANDB_SILENT": "true"},
                   unset=("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR"))
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "reported"
    assert f"note: no wandb API key found; wandb logs offline to {out}/wandb" in result.stdout + result.stderr
    assert list(out.glob("runs/*/events.out.tfevents.*"))  # tensorboard
    assert list((out / "wandb").glob("offline-run-*"))  # wandb, offline, inside output_dir
    assert not (tmp_path / "wandb").exists()  # nothing left in the working directory


def test_checkpointing_reaches_sft_config_under_the_installed_transformers_name():
    """transformers 5.23 renamed gradient_checkpointing* to activation_checkpointing*; a recipe with either name
    must run on either version (the H200 image's transformers 5.17 refused the new name in every run)."""
    import dataclasses

    from trl import SFTConfig

    from ftkit.train.args import checkpointing_name, set_checkpointing

    @dataclasses.dataclass
    class OldConfig:  # the fields transformers < 5.23 has
        gradient_checkpointing: bool = False
        gradient_checkpointing_kwargs: dict | None = None

    args = {"activation_checkpointing_kwargs": {"use_reentrant": True}, "gradient_checkpointing": True}
    set_checkpointing(args, True, checkpointing_name(OldConfig))
    assert args == {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": True}}
    OldConfig(**args)

    name = checkpointing_name(SFTConfig)
    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    assert name in fields
    args = {"gradient_checkpointing": False}
    set_checkpointing(args, True, name)
    assert args == {name: True, f"{name}_kwargs": {"use_reentrant": False}}
    assert getattr(SFTConfig(output_dir="unused", use_cpu=True, bf16=False, **args), name) is True


@pytest.mark.slow
def test_model_init_kwargs_reach_from_pretrained(tiny_model, tmp_path):
    """ftkit loads the model itself, so TRL would silently ignore model_init_kwargs: ftkit passes them on."""
    from ftkit.train.run import run_training

    recipe = make_recipe(tmp_path, tiny_model, "init-kwargs", use_peft=False, lora_modules_to_save=None, max_steps=1,
                         model_init_kwargs={"rms_norm_eps": 1e-3})
    out = run_training(load_recipe(recipe), log=lambda *_: None)
    assert json.loads((out / "config.json").read_text())["rms_norm_eps"] == 1e-3


def test_liger_kernel_is_refused_on_a_cpu_run(tmp_path):
    from ftkit.config.checks import check_for_device
    from ftkit.errors import FtkitError

    recipe = load_recipe(None, raw={"model_name_or_path": "org/model", "dataset_name": "org/data",
                                    "use_liger_kernel": False})
    check_for_device(recipe, "cpu")
    recipe.sft["use_liger_kernel"] = True
    check_for_device(recipe, "cuda")
    with pytest.raises(FtkitError, match="Liger's Triton kernels run on CUDA GPUs only"):
        check_for_device(recipe, "cpu")
