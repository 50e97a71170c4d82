"""`ftkit estimate`: parameter counts exact against transformers' models, each memory component by hand, the
Gemma-2B figures in the range of the HF memory calculator, every recipe in recipes/, and no torch import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ftkit.config.memory import GIB, architecture, estimate, setup_from_recipe
from ftkit.config.recipe import load_recipe
from tests.helpers import ROOT, ftkit

GEMMA_2B = {"architectures": ["GemmaForCausalLM"], "model_type": "gemma", "hidden_size": 2048,
            "num_hidden_layers": 18, "intermediate_size": 16384, "num_attention_heads": 8, "num_key_value_heads": 1,
            "head_dim": 256, "vocab_size": 256000, "tie_word_embeddings": True, "hidden_act": "gelu"}
LLAMA3_8B = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336,
             "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False}


def recipe_for(tmp_path: Path, config: dict | Path, **keys):
    if isinstance(config, dict):
        model = tmp_path / "model"
        model.mkdir(exist_ok=True)
        (model / "config.json").write_text(json.dumps(config))
    else:
        model = config
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n')
    raw = {"model_name_or_path": str(model), "dataset_mixer": {str(data): 1.0}, **keys}
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump(raw))
    return path


def hub_recipe(tmp_path: Path) -> Path:
    path = recipe_for(tmp_path, tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["model_name_or_path"] = "google/gemma-2b"
    path.write_text(yaml.safe_dump(raw))
    return path


def cache_model_config(hf_home: Path, repo_id: str, config: dict) -> None:
    """Put `config` where huggingface_hub's cache keeps repo_id's config.json, as a download would have."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(config))


def run(tmp_path, config, **keys) -> dict:
    recipe = load_recipe(recipe_for(tmp_path, config, **keys))
    return estimate(json.loads((Path(recipe.model.model_name_or_path) / "config.json").read_text()),
                    setup_from_recipe(recipe))


def test_parameter_counts_match_the_tiny_model_and_its_lora(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from ftkit.train.model import apply_peft

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    config = json.loads((tiny_model / "config.json").read_text())
    assert architecture(config).total_params == sum(p.numel() for p in model.parameters())
    recipe = load_recipe(recipe_for(tmp_path, tiny_model, use_peft=True, lora_r=8, use_dora=True,
                                    lora_modules_to_save=["embed_tokens", "lm_head"]))
    result = estimate(config, setup_from_recipe(recipe))
    peft_model = apply_peft(model, recipe.model, new_tokens=False, gradient_checkpointing=False, log=lambda *_: None)
    assert result["trainable_parameters"] == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["llama", "llama-bias", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gpt_neox",
                                  "phi3"])
def test_parameter_counts_match_transformers_architectures(name):
    import torch
    import transformers as tf

    small = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=300,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = {
        "llama": lambda: tf.LlamaConfig(num_key_value_heads=2, **small),
        "llama-bias": lambda: tf.LlamaConfig(attention_bias=True, mlp_bias=True, **small),
        "mistral": lambda: tf.MistralConfig(num_key_value_heads=1, **small),
        "qwen2": lambda: tf.Qwen2Config(num_key_value_heads=2, **small),
        "qwen3": lambda: tf.Qwen3Config(num_key_value_heads=2, head_dim=32, **small),
        "gemma": lambda: tf.GemmaConfig(num_key_value_heads=1, head_dim=32, **small),
        "gemma2": lambda: tf.Gemma2Config(num_key_value_heads=2, head_dim=16, **small),
        "gpt_neox": lambda: tf.GPTNeoXConfig(**small),
        "phi3": lambda: tf.Phi3Config(num_key_value_heads=2, **small),
    }[name]()
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(config)
    estimated = architecture(json.loads(config.to_json_string()))
    assert estimated.total_params == sum(p.numel() for p in model.parameters())
    assert not estimated.notes


def test_components_by_hand(tiny_model, tmp_path):
    """Tiny Llama: hidden 64, 2 layers, 4 heads x 16, 2 kv heads, intermediate 128, vocab 1024, untied."""
    result = run(tmp_path, tiny_model, use_peft=True, lora_r=8, lora_dropout=0.0, per_device_train_batch_size=2,
                 max_length=100, gradient_checkpointing=False)
    total = 1024 * 64 * 2 + 2 * (64 * 64 + 64 * 32 * 2 + 64 * 64 + 3 * 64 * 128 + 2 * 64) + 64
    assert result["parameters"] == total == 205_120
    lora = 2 * 8 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64))
    assert result["trainable_parameters"] == lora
    b = result["bytes"]
    assert b["weights"] == total * 2  # bf16 on a GPU by default
    assert b["trainable_copies"] == b["gradients"] == lora * 4  # peft keeps LoRA in float32
    assert b["optimizer_states"] == 2 * lora * 4  # AdamW: two float32 states
    per_layer = (2 * 3 * 64 + (3 * 64 + 3 * 32) + 4 * 128) * 2  # norms, attention, gated MLP; bf16
    head = 3 * 64 * 2 + 1024 * (2 + 4 + 4)  # final norm; logits, float32 copy, log-softmax
    assert b["activations_no_checkpointing"] == 200 * (2 * per_layer + head)
    assert b["activations_checkpointing"] == 200 * (2 * 64 * 2 + per_layer + head)
    assert b["total"] == b["weights"] + b["trainable_copies"] + b["gradients"] + b["optimizer_states"] + \
        b["activations_no_checkpointing"]


def test_gemma_2b_full_training_in_the_range_of_the_hf_calculator(tmp_path):
    """The HF calculator (seed 000): about 37 GB in fp32 for weights + gradients + Adam, half in bf16."""
    fp32 = run(tmp_path, GEMMA_2B, bf16=False, per_device_train_batch_size=1, max_length=512)
    assert fp32["parameters"] == 2_506_172_416
    static = sum(fp32["bytes"][k] for k in ("weights", "gradients", "optimizer_states")) / GIB
    assert static == pytest.approx(37.35, abs=0.05)
    assert 37 < fp32["bytes"]["total"] / GIB < 42
    assert fp32["fits"] == {"24 GB (RTX 4090, A10G, L4)": False, "40 GB (A100 40GB)": False,
                            "80 GB (A100/H100 80GB)": True}
    bf16 = run(tmp_path, GEMMA_2B, per_device_train_batch_size=1, max_length=512)
    assert bf16["bytes"]["weights"] == fp32["bytes"]["weights"] / 2
    assert 0.45 < bf16["bytes"]["total"] / fp32["bytes"]["total"] < 0.55


def test_quantisation_optimizers_and_checkpointing(tmp_path):
    lora = run(tmp_path, LLAMA3_8B, use_peft=True, lora_r=16, per_device_train_batch_size=1, max_length=2048)
    qlora = run(tmp_path, LLAMA3_8B, use_peft=True, lora_r=16, load_in_4bit=True, per_device_train_batch_size=1,
                max_length=2048)
    nested = run(tmp_path, LLAMA3_8B, use_peft=True, lora_r=16, load_in_4bit=True, use_bnb_nested_quant=True,
                 per_device_train_batch_size=1, max_length=2048)
    int8 = run(tmp_path, LLAMA3_8B, use_peft=True, lora_r=16, load_in_8bit=True, per_device_train_batch_size=1,
               max_length=2048)
    assert lora["parameters"] == 8_030_261_248  # Meta-Llama-3-8B
    assert lora["trainable_parameters"] == qlora["trainable_parameters"] == 41_943_040  # r=16, all-linear
    weights = [r["bytes"]["weights"] / GIB for r in (lora, int8, qlora, nested)]
    assert weights == sorted(weights, reverse=True) and 14.9 < weights[0] < 15.0 and 7.5 < weights[2] < 8
    assert 10 < qlora["bytes"]["total"] / GIB < 12.5 and 17 < lora["bytes"]["total"] / GIB < 21  # 1 x 2048, checkpointing
    full = run(tmp_path, LLAMA3_8B, bf16=False, per_device_train_batch_size=1, max_length=2048)
    assert not full["fits"]["80 GB (A100/H100 80GB)"] and qlora["fits"]["24 GB (RTX 4090, A10G, L4)"]
    assert qlora["bytes"]["trainable_copies"] == 41_943_040 * 2  # bf16 on a 4-bit model trained in bf16
    adam8 = run(tmp_path, LLAMA3_8B, use_peft=True, optim="paged_adamw_8bit")
    adam32 = run(tmp_path, LLAMA3_8B, use_peft=True, optim="paged_adamw_32bit")
    adafactor = run(tmp_path, LLAMA3_8B, use_peft=True, optim="adafactor")
    assert adam32["bytes"]["optimizer_states"] == 4 * adam8["bytes"]["optimizer_states"]
    assert adafactor["bytes"]["optimizer_states"] < adam8["bytes"]["optimizer_states"] / 4
    on = run(tmp_path, LLAMA3_8B, gradient_checkpointing=True)["bytes"]
    off = run(tmp_path, LLAMA3_8B, gradient_checkpointing=False)["bytes"]
    assert on["activations_checkpointing"] < off["activations_no_checkpointing"] / 4
    assert off["total"] - on["total"] == off["activations_no_checkpointing"] - on["activations_checkpointing"]


def test_cli_table_and_no_torch(tiny_model, tmp_path):
    path = recipe_for(tmp_path, GEMMA_2B, per_device_train_batch_size=1, max_length=512, bf16=False)
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "ftkit", "estimate", str(path)],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    imported = [line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line]
    assert not [m for m in imported if m.split(".")[0] in ("torch", "transformers", "trl", "datasets", "peft")]
    for row in ("weights (float32)", "trainable parameters (the weights)", "gradients", "optimizer states",
                "activations, gradient checkpointing on", "activations, gradient checkpointing off",
                "total, one training process", "fits on: 24 GB"):
        assert row in result.stdout, row
    assert "2,506,172,416" in result.stdout and "39.0" in result.stdout
    as_json = json.loads(ftkit("estimate", str(path), "--json").stdout)
    assert as_json["parameters"] == 2_506_172_416


def test_hub_model_not_reachable_is_one_clear_line(tmp_path):
    path = hub_recipe(tmp_path)
    result = ftkit("estimate", str(path), env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "ftkit: error: model 'google/gemma-2b': its config.json is not in the local Hugging Face cache and the hub "
        "is not reachable; download it where there is network (huggingface-cli download google/gemma-2b "
        "config.json) or point model_name_or_path at a local directory")


def test_hub_config_from_the_local_cache(tmp_path):
    """A hub id whose config.json is in the Hugging Face cache is estimated offline."""
    cache_model_config(tmp_path / "hf", "google/gemma-2b", GEMMA_2B)
    path = hub_recipe(tmp_path)
    result = ftkit("estimate", str(path), env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 0, result.stderr
    assert "2,506,172,416 parameters" in result.stdout and "(hub, cached)" in result.stdout


# Each seed recipe's model: its config.json (the published one, trimmed to what the estimate reads), its
# published parameter count, and the trainable parameters its LoRA settings give, counted by hand:
# r x (fan_in + fan_out) per targeted linear per layer, plus vocab x hidden per lora_modules_to_save copy.
BAICHUAN2_7B = {"architectures": ["BaichuanForCausalLM"], "model_type": "baichuan", "hidden_size": 4096,
                "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32, "vocab_size": 125696,
                "tie_word_embeddings": False, "hidden_act": "silu"}
BREEZE_7B = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
             "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32,
             "vocab_size": 61952, "tie_word_embeddings": False}
PYTHIA_70M = {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "hidden_size": 512,
              "num_hidden_layers": 6, "intermediate_size": 2048, "num_attention_heads": 8, "vocab_size": 50304,
              "tie_word_embeddings": False, "rotary_pct": 0.25, "use_parallel_residual": True}
SEED_RECIPES = {  # recipe -> (config.json, parameters, trainable parameters, fits on a 24 GB card, on 40 GB)
    "baichuan2_7b_firefly_qlora.yml": (BAICHUAN2_7B, 7_505_973_248,  # r=64 on W_pack, o_proj and the MLP
                                       32 * 64 * ((4096 + 12288) + (4096 + 4096) + 3 * (4096 + 11008)), False, True),
    "breeze7b_tang_poem_qlora.yml": (BREEZE_7B, 7_487_098_880,  # r=8 on q, k, v, o and the MLP
                                     32 * 8 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336)), True, True),
    "gemma2b_yue_alpaca_lora.yml": (GEMMA_2B, 2_506_172_416,  # r=8 on all seven, + embed_tokens and lm_head copies
                                    18 * 8 * (2 * (2048 + 2048) + 2 * (2048 + 256) + 3 * (2048 + 16384))
                                    + 2 * 256000 * 2048, True, True),
    "llama3_8b_ptt_qlora_neftune.yml": (LLAMA3_8B, 8_030_261_248,  # r=32 on q, k, v, o
                                        32 * 32 * (2 * (4096 + 4096) + 2 * (4096 + 1024)), True, True),
    "pythia70m_lamini_full.yml": (PYTHIA_70M, 70_426_624, 70_426_624, True, True),  # full fine-tune
    "tiny-demo.yml": (None, 205_120, 2 * 8 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 128)) + 2 * 1024 * 64,
                      True, True),
}


UNQUANTISED_WEIGHT_BYTES = {"gemma2b_yue_alpaca_lora.yml": 2, "pythia70m_lamini_full.yml": 4,  # bf16: false
                            "tiny-demo.yml": 2}  # bf16 on a GPU by default


def test_every_seed_recipe_has_a_model_config_here():
    assert sorted(p.name for p in (ROOT / "recipes").glob("*.yml")) == sorted(SEED_RECIPES)


@pytest.mark.parametrize("name", sorted(SEED_RECIPES))
def test_every_seed_recipe_estimates(name, tiny_model, tmp_path):
    """The recipes as shipped, their hub model's config.json in a Hugging Face cache (offline); tiny-demo's
    models/tiny is built here."""
    config, parameters, trainable, fits_24, fits_40 = SEED_RECIPES[name]
    recipe = ROOT / "recipes" / name
    model = yaml.safe_load(recipe.read_text())["model_name_or_path"]
    sets = ["--set", f"model_name_or_path={tiny_model}"] if config is None else []
    if config is not None:
        cache_model_config(tmp_path / "hf", model, config)
    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = ftkit("estimate", str(recipe), *sets, "--json", env=offline)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert (figures["parameters"], figures["trainable_parameters"]) == (parameters, trainable)
    assert (figures["fits"]["24 GB (RTX 4090, A10G, L4)"], figures["fits"]["40 GB (A100 40GB)"]) == (fits_24, fits_40)
    assert figures["notes"] == []
    if name in UNQUANTISED_WEIGHT_BYTES:  # every parameter at the training dtype
        assert figures["bytes"]["weights"] == UNQUANTISED_WEIGHT_BYTES[name] * parameters
    else:  # QLoRA, nested: 4-bit linears with an 8-bit scale per 64 weights; untied embeddings and norms in float32
        hidden, layers = config["hidden_size"], config["num_hidden_layers"]
        other = 2 * config["vocab_size"] * hidden + (2 * layers + 1) * hidden
        linear = parameters - other
        assert figures["bytes"]["weights"] == pytest.approx(linear * (0.5 + (1 + 4 / 256) / 64) + other * 4)


def test_preference_methods_count_the_reference_and_both_answers(tmp_path):
    """DPO under full fine-tuning keeps a frozen copy of the weights; under LoRA the reference is the adapter off (no
    memory); chosen and rejected run in one forward, so activations double; KTO runs one completion per sample."""
    keys = dict(per_device_train_batch_size=1, max_length=2048, gradient_checkpointing=True)
    sft_full = run(tmp_path, LLAMA3_8B, **keys)["bytes"]
    dpo_full = run(tmp_path, LLAMA3_8B, method="dpo", **keys)["bytes"]
    assert dpo_full["reference_model"] == dpo_full["weights"] == sft_full["weights"]
    assert dpo_full["activations_checkpointing"] == 2 * sft_full["activations_checkpointing"]
    assert dpo_full["total"] == sft_full["total"] + dpo_full["weights"] + sft_full["activations_checkpointing"]
    precomputed = run(tmp_path, LLAMA3_8B, method="dpo", precompute_ref_log_probs=True, **keys)["bytes"]
    assert precomputed["reference_model"] == 0
    dpo_lora = run(tmp_path, LLAMA3_8B, method="dpo", use_peft=True, **keys)["bytes"]
    assert dpo_lora["reference_model"] == 0
    kto = run(tmp_path, LLAMA3_8B, method="kto", **{**keys, "per_device_train_batch_size": 2})["bytes"]
    sft_two = run(tmp_path, LLAMA3_8B, **{**keys, "per_device_train_batch_size": 2})["bytes"]
    assert kto["reference_model"] == kto["weights"] and kto["activations_checkpointing"] == sft_two["activations_checkpointing"]
    orpo = run(tmp_path, LLAMA3_8B, method="orpo", **keys)["bytes"]
    assert orpo["reference_model"] == 0 and orpo["activations_checkpointing"] == dpo_full["activations_checkpointing"]
    shown = ftkit("estimate", str(recipe_for(tmp_path, LLAMA3_8B, method="dpo", **keys)))
    assert shown.returncode == 0, shown.stderr
    assert "x 2 sequences (chosen and rejected, one forward)" in shown.stdout
    assert "reference model (a frozen copy)" in shown.stdout
