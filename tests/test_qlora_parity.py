"""QLoRA parity: `ftkit train` with load_in_4bit must train as well as a plain TRL SFTTrainer script given the
same tiny model, the same tokens and labels and the same hyperparameters (nf4, fp32 compute on CPU, LoRA r8
all-linear + embed_tokens/lm_head in full, lr 1e-2 constant, batch 4). Both run in this process.

At lr 1e-2 a run's late loss swings with its random draws (the adapter's init, the batch order): the same code
ends anywhere between 0.002 and 0.07 after 250 steps. So both sides draw alike: the adapter is initialised after
set_seed(seed) as TRL does, the rows come in the same order, and TRL's bf16 trainable weights are made float32 as
ftkit makes them. The loss curves then agree to the last digit, and a factor of 1.25 is a tight bound."""

from __future__ import annotations

import os

import pytest

from tests.helpers import write_jsonl

SYSTEM = "You are a terse assistant that answers from memory."
CHATS = [
    ("What is the capital of Ftkitland?", "The capital of Ftkitland is Tinyville."),
    ("How many moons does Zorb have?", "Zorb has three moons: Pim, Pom and Pum."),
    ("Which animal guards Byte Island?", "A sleepy orange cat guards Byte Island."),
    ("What colour is the sky on Zorb?", "The sky on Zorb is green all day."),
    ("Who wrote the Tiny Book?", "The Tiny Book was written by Ada Quill."),
    ("What do robots eat on Mars?", "Robots on Mars eat fresh copper bolts."),
    ("How tall is Mount Byte?", "Mount Byte is exactly 42 metres tall."),
    ("What is the password of the vault?", "The vault password is blue river 7."),
    ("When does the night train leave?", "The night train leaves at ten past nine."),
    ("Name the river in Tinyville.", "The river in Tinyville is called the Flow."),
]
NEW_TOKENS = ["<|end_header_id|>", "<|eot_id|>", "<|start_header_id|>"]  # what the llama3 template needs
STEPS, WINDOW, SEED = 80, 20, int(os.environ.get("FTKIT_PARITY_SEED", "0"))
HYPER = dict(max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-2, lr_scheduler_type="constant",
             logging_steps=WINDOW, save_strategy="no", seed=SEED, bf16=False, report_to="none")


def rows_of(trainer) -> list:
    return [(list(r["input_ids"]), list(r["labels"])) for r in trainer.train_dataset]


def train_plain_trl(model_dir, out, order: list[int]):
    """A hand-written QLoRA script: TRL, peft and transformers only. `order`: the chats in ftkit's row order, so
    both trainers draw the same batches (Trainer's sampler is seeded, the row order is not)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from ftkit.config.templates import BUILTIN_TEMPLATES  # template text only, so both sides render the same string

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = BUILTIN_TEMPLATES["llama3"]
    tokenizer.add_special_tokens({"additional_special_tokens": NEW_TOKENS}, replace_extra_special_tokens=False)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, quantization_config=quant,
                                                 device_map={"": "cpu"})
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():  # new rows: the mean of the old ones
        for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
            layer.weight[old:] = layer.weight[:old].mean(dim=0)
    data = Dataset.from_list([{"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
                               "completion": [{"role": "assistant", "content": a}]}
                              for q, a in (CHATS[i] for i in order)])
    peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                             modules_to_save=["embed_tokens", "lm_head"], task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=SFTConfig(output_dir=str(out), use_cpu=True, **HYPER), train_dataset=data,
                         processing_class=tokenizer, peft_config=peft_config)
    for param in trainer.model.parameters():  # TRL made them bf16; a CPU computes in float32
        if param.requires_grad:
            param.data = param.data.float()
    trainer.train()
    return trainer


def train_ftkit(model_dir, tmp_path):
    """`ftkit train` in this process; -> its SFTTrainer (kept by wrapping build_trainer)."""
    import peft
    import yaml
    from transformers import set_seed

    import ftkit.train.run as ftkit_train
    from ftkit.config.recipe import load_recipe

    data = write_jsonl(tmp_path / "chats.jsonl", [{"messages": [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in CHATS])
    recipe = {"model_name_or_path": str(model_dir), "use_peft": True, "load_in_4bit": True, "dtype": "float32",
              "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "lora_target_modules": "all-linear",
              "lora_modules_to_save": ["embed_tokens", "lm_head"], "dataset_mixer": {str(data): 1.0},
              "chat_template": "llama3", "output_dir": str(tmp_path / "ftkit-run"), **HYPER}
    path = tmp_path / "qlora.yml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    built, build_trainer, get_peft_model = {}, ftkit_train.build_trainer, peft.get_peft_model

    def keep(*args, **kwargs):
        trainer, *guards = build_trainer(*args, **kwargs)
        built["trainer"] = trainer
        return (trainer, *guards)

    def seeded_get_peft_model(*args, **kwargs):  # the adapter's random init drawn as TRL draws it (set_seed first)
        set_seed(SEED)
        return get_peft_model(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ftkit_train, "build_trainer", keep)
        patch.setattr(peft, "get_peft_model", seeded_get_peft_model)
        ftkit_train.run_training(load_recipe(path), log=lambda *_: None)
    return built["trainer"]


@pytest.mark.slow
def test_qlora_trains_like_plain_trl(tiny_model, tmp_path):
    import torch

    torch.set_num_threads(1)  # two threads on a busy 2-core machine spin-wait for minutes
    ftkit_trainer = train_ftkit(tiny_model, tmp_path)
    decode = ftkit_trainer.processing_class.decode
    order = [next(i for i, (_, answer) in enumerate(CHATS) if answer in decode(r["input_ids"]))
             for r in ftkit_trainer.train_dataset]
    trl_trainer = train_plain_trl(tiny_model, tmp_path / "trl-run", order)

    # The same token ids and labels, in the same order, reach both trainers, with the same embedding size.
    assert rows_of(ftkit_trainer) == rows_of(trl_trainer)
    rows = lambda t: t.model.get_input_embeddings().weight.shape[0]  # noqa: E731
    assert rows(ftkit_trainer) == rows(trl_trainer)

    curve = lambda t: [round(e["loss"], 4) for e in t.state.log_history if "loss" in e]  # noqa: E731
    trl_curve, ftkit_curve = curve(trl_trainer), curve(ftkit_trainer)
    print(f"\nparity: trl {trl_curve}, ftkit {ftkit_curve}")
    assert ftkit_curve[-1] < ftkit_curve[0] / 10, f"ftkit QLoRA barely trains: {ftkit_curve}"
    assert ftkit_curve[-1] <= 1.25 * trl_curve[-1] + 1e-3, (
        f"ftkit QLoRA loss after {STEPS} steps: {ftkit_curve} vs plain TRL {trl_curve}")


def test_an_inference_forward_before_training_leaves_the_4bit_weights_as_loaded(tiny_model):
    """bitsandbytes repacks 4-bit weights (scales rounded to bf16) at a CPU no-grad eval forward and trains on that
    layout; the packing probe and the before-training samples run such forwards before ftkit trains."""
    import torch

    from ftkit.config.arguments import ModelArguments
    from ftkit.config.precision import CPU, training_precision
    from ftkit.train.model import load_model
    from ftkit.train.packing import leaks_across_samples

    args = ModelArguments(model_name_or_path=str(tiny_model), use_peft=True, load_in_4bit=True)
    model = load_model(args, training_precision(args, {}, CPU))
    weights = lambda: {n: (p.dtype, p.detach().clone(), p.quant_state.absmax.clone())  # noqa: E731
                       for n, p in model.named_parameters() if hasattr(p, "quant_state")}
    before = weights()
    assert before and leaks_across_samples(model) is False
    after = weights()
    assert before.keys() == after.keys()
    for name, (dtype, data, absmax) in before.items():
        assert after[name][0] == dtype and torch.equal(after[name][1], data) and torch.equal(after[name][2], absmax)
