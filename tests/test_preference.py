"""Preference training: the method key, per-method keys, preference data and its masks, and DPO/KTO/ORPO/SimPO runs
on the tiny model (DPO and KTO from a finished SFT run, which stays untouched; ORPO and SimPO from the base)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

from ftkit.config.recipe import load_recipe
from ftkit.errors import FtkitError
from tests.helpers import (CHATS, ROOT, SHORT_ANSWERS, SYSTEM, assert_gives_chosen, ftkit, preference_recipe,
                           preference_rows, snapshot, write_jsonl)

FIXTURES = ROOT / "tests" / "fixtures" / "alignment-handbook"
QUIET = lambda *_: None  # noqa: E731


def recipe_text(tmp_path: Path, text: str) -> Path:
    (tmp_path / "m").mkdir(exist_ok=True)
    (tmp_path / "m" / "config.json").write_text("{}", encoding="utf-8")
    data = write_jsonl(tmp_path / "p.jsonl", preference_rows())
    path = tmp_path / "r.yml"
    path.write_text(f"model_name_or_path: {tmp_path / 'm'}\ndataset_mixer:\n  {data}: 1.0\n{text}", encoding="utf-8")
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(FtkitError) as err:
        load_recipe(path)
    return err.value.lines


# ------------------------------------------------------------------------------------------------------ the recipe

def test_method_and_its_peer_spellings(tmp_path):
    assert load_recipe(recipe_text(tmp_path, "")).method == "sft"
    for key in ("method", "rl", "stage", "trainer"):
        recipe = load_recipe(recipe_text(tmp_path, f"{key}: kto\n"))
        assert recipe.method == "kto", key
        assert any(f"'{key}'" in note and "read as 'method'" for note in recipe.notes) == (key != "method")
    assert problems(recipe_text(tmp_path, "method: ppo\n"))[0].endswith(
        "'method': 'ppo' is not one of: sft, dpo, kto, orpo, simpo, cpo (did you mean 'dpo'?)")
    assert "set method: dpo and loss_type: ipo" in problems(recipe_text(tmp_path, "rl: ipo\n"))[0]


@pytest.mark.parametrize("extra", ["beta: 0.05\n", "loss_type: apo_zero\n", "loss_type: [sigmoid, sft]\n",
                                   "max_prompt_length: 512\n", "precompute_ref_log_probs: true\n"])
def test_dpo_is_inferred_from_keys_only_preference_trainers_take(tmp_path, extra):
    recipe = load_recipe(recipe_text(tmp_path, extra))
    key = extra.split(":")[0]
    assert recipe.method == "dpo"
    assert any(f"method dpo inferred from '{key}'" in note for note in recipe.notes)


def test_sft_loss_type_stays_sft(tmp_path):
    recipe = load_recipe(recipe_text(tmp_path, "loss_type: dft\n"))
    assert recipe.method == "sft" and recipe.sft["loss_type"] == "dft"


def test_a_key_of_another_method_names_that_method(tmp_path):
    path = recipe_text(tmp_path, "method: dpo\npacking: true\ndesirable_weight: 2.0\nbeta: 0.1\n")
    assert problems(path) == [
        f"{path}:5: 'packing' is a key of method sft (SFTConfig), not of dpo (DPOConfig); remove it",
        f"{path}:6: 'desirable_weight' is a key of method kto (KTOConfig), not of dpo (DPOConfig); set method: kto"]
    path = recipe_text(tmp_path, "method: sft\nsimpo_gamma: 0.5\n")
    assert problems(path) == [f"{path}:5: 'simpo_gamma' is a key of method simpo (CPOConfig), cpo (CPOConfig), not "
                              "of sft (SFTConfig); set method: simpo or cpo"]
    path = recipe_text(tmp_path, "method: sft\nmax_prompt_length: 10\n")
    assert problems(path)[0].endswith("'max_prompt_length' applies to preference training only; set method: dpo (or "
                                      "kto, orpo, simpo), or remove it")
    assert problems(recipe_text(tmp_path, "method: dpo\nbeat: 0.1\n"))[0].endswith("(did you mean 'beta'? see: ftkit keys beta)")


def test_loss_type_validates_against_the_methods_own_values(tmp_path):
    recipe = load_recipe(recipe_text(tmp_path, "method: dpo\nloss_type: sigmoid\n"))
    assert recipe.sft["loss_type"] == ["sigmoid"]  # DPOConfig takes a list
    path = recipe_text(tmp_path, "method: dpo\nloss_type: [sigmoid, sfft]\n")
    assert problems(path) == [f"{path}:5: 'loss_type': 'sfft' is not one of: sigmoid, hinge, ipo, exo_pair, nca_pair, "
                              "robust, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sft, "
                              "sigmoid_norm (did you mean 'sft'?)"]
    assert "'nll' is not one of: kto, apo_zero_unpaired" in problems(recipe_text(tmp_path, "method: kto\nloss_type: nll\n"))[0]
    assert load_recipe(recipe_text(tmp_path, "method: simpo\n")).sft_value("loss_type") == "simpo"
    assert load_recipe(recipe_text(tmp_path, "method: dpo\n")).sft_value("learning_rate") == 1e-6  # DPOConfig's own


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.glob("*.yaml")))
def test_alignment_handbook_preference_recipes_validate_unchanged(name):
    result = ftkit("validate", str(FIXTURES / name))
    if name == "smollm3_dpo_apo.yaml":  # asks for Liger's CUDA kernels, which this machine does not have
        assert result.returncode == 2
        assert result.stderr.strip().splitlines()[-1].endswith("'use_liger_kernel': needs the liger-kernel package "
                                                              "(pip install liger-kernel), whose Triton kernels run on "
                                                              "CUDA GPUs only; or set use_liger_kernel: false")
        assert len([line for line in result.stderr.splitlines() if line.startswith("ftkit: error")]) == 1
        return
    assert result.returncode == 0, result.stderr
    assert ": ok (" in result.stdout and ", dpo, " in result.stdout
    assert "method dpo inferred from 'beta'" in result.stderr


def test_validate_does_not_import_torch_for_a_preference_recipe():
    import subprocess
    import sys

    path = FIXTURES / "zephyr-7b-beta_dpo_config_qlora.yaml"
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "ftkit", "validate", str(path)], cwd=ROOT,
                            capture_output=True, text=True)
    imported = [line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line]
    assert not [m for m in imported if m.split(".")[0] in ("torch", "transformers", "trl", "datasets")]


# ------------------------------------------------------------------------------------------------------ the data

@pytest.fixture(scope="module")
def chat_format(tiny_model):
    from ftkit.config.arguments import ModelArguments
    from ftkit.train.model import load_tokenizer

    return load_tokenizer(ModelArguments(model_name_or_path=str(tiny_model)), None, QUIET)[1]


def prepared(tmp_path: Path, tiny_model: Path, rows: list[dict], **keys):
    from ftkit.data.preference import build_preference_datasets
    from ftkit.train.model import load_tokenizer

    recipe = load_recipe(preference_recipe(tmp_path, tiny_model, "data", keys.pop("method", "dpo"), rows, **keys))
    chat_format = load_tokenizer(recipe.model, recipe.data.chat_template, QUIET)[1]
    return build_preference_datasets(recipe, chat_format, use_cache=False, log=QUIET)


def plain(rows):
    return [{"prompt": r["prompt"][1]["content"], "chosen": r["chosen"][0]["content"],
             "rejected": r["rejected"][0]["content"]} for r in rows]


def ultrafeedback(rows):
    return [{"prompt": r["prompt"][1]["content"], "chosen": r["prompt"][1:] + r["chosen"],
             "rejected": r["prompt"][1:] + r["rejected"], "score_chosen": 8.0} for r in rows]


@pytest.mark.parametrize("shape", ["conversational", "plain", "ultrafeedback"])
def test_chosen_and_rejected_carry_exactly_their_answer_and_end_of_turn(tmp_path, tiny_model, chat_format, shape):
    rows = {"conversational": preference_rows(), "plain": plain(preference_rows()),
            "ultrafeedback": ultrafeedback(preference_rows())}[shape]
    data = prepared(tmp_path, tiny_model, rows, system_prompt=SYSTEM)
    tokenizer = chat_format.tokenizer
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    by_prompt = {tokenizer.decode(row["prompt_ids"]): row for row in data.train}
    assert len(by_prompt) == len(CHATS)
    for (question, answer), short in zip(CHATS, SHORT_ANSWERS):
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        row = by_prompt[chat_format.prompt(messages)]
        for ids, text in ((row["chosen_ids"], short), (row["rejected_ids"], answer)):
            [sft] = chat_format.encode(messages + [{"role": "assistant", "content": text}])  # SFT's exact masks
            first = next(i for i, label in enumerate(sft.labels) if label != -100)
            assert row["prompt_ids"] == sft.input_ids[:first]
            assert ids == [label for label in sft.labels if label != -100]
            assert ids == tokenizer(text, add_special_tokens=False)["input_ids"] + [end]


def test_kto_takes_labelled_completions_and_unpairs_pairs(tmp_path, tiny_model):
    labelled = [{"prompt": r["prompt"], "completion": r["chosen"], "label": i % 2 == 0}
                for i, r in enumerate(preference_rows()[:3])]
    data = prepared(tmp_path, tiny_model, labelled, method="kto")
    assert sorted(data.train["label"]) == [False, True, True]
    assert set(data.train.column_names) == {"prompt_ids", "completion_ids", "label"}
    pairs = prepared(tmp_path, tiny_model, preference_rows()[:2], method="kto")  # each pair: two labelled rows
    assert sorted(pairs.train["label"]) == [False, False, True, True]
    with pytest.raises(FtkitError, match="KTO's unpaired form; dpo needs chosen/rejected pairs"):
        prepared(tmp_path, tiny_model, labelled)


@pytest.mark.parametrize("change, message", [
    (lambda r: r.pop("chosen"), "missing or empty 'chosen'"),
    (lambda r: r.update(rejected=r["chosen"]), "'chosen' and 'rejected' are the same answer; nothing to prefer"),
    (lambda r: r.update(prompt="q", chosen=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
                        rejected=[{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]),
     "the prompt turns of 'chosen' and 'rejected' differ; a pair answers one prompt"),
    (lambda r: r.update(chosen=[{"role": "user", "content": "x"}]), "'chosen' does not end with an assistant answer"),
    (lambda r: r.update(chosen=7), "'chosen' must be text or a list of {role, content} messages, got int"),
])
def test_bad_rows_are_named_by_source_and_row(tmp_path, tiny_model, change, message):
    rows = preference_rows()
    change(rows[2])
    with pytest.raises(FtkitError) as err:
        prepared(tmp_path, tiny_model, rows)
    assert err.value.lines == [f"source '{tmp_path / 'data.jsonl'}', row 3: {message} (set on_bad_rows: skip to skip "
                               "such rows)"]
    assert prepared(tmp_path, tiny_model, rows, on_bad_rows="skip").stats.skipped_bad_rows == 1


def test_max_prompt_length_keeps_the_prompts_end_and_max_length_cuts_answers(tmp_path, tiny_model):
    whole = prepared(tmp_path, tiny_model, preference_rows())
    cut = prepared(tmp_path, tiny_model, preference_rows(), max_prompt_length=5, max_length=12)
    for full, short in zip(whole.train, cut.train):
        assert short["prompt_ids"] == full["prompt_ids"][-5:]
        assert short["chosen_ids"] == full["chosen_ids"][:7] and short["rejected_ids"] == full["rejected_ids"][:7]
    assert cut.stats.truncated == len(CHATS)
    with pytest.raises(FtkitError, match="every sample was dropped"):
        prepared(tmp_path, tiny_model, preference_rows(), max_prompt_length=5, max_length=12, overlong="drop")


def test_samples_md_shows_chosen_and_rejected(tmp_path):
    from ftkit.data.preference import PAIRED, normalise_row
    from ftkit.train.samples import pick_samples, write_markdown

    rows = [normalise_row(preference_rows()[0], PAIRED, None), {"prompt": [], "completion": {"content": "no"},
                                                                  "label": False}]
    picked = pick_samples(None, rows, 5)  # an undesirable KTO completion is no reference
    assert len(picked) == 1
    picked[0].before, picked[0].after = "old", SHORT_ANSWERS[0]
    write_markdown(picked, tmp_path / "samples.md")
    text = (tmp_path / "samples.md").read_text(encoding="utf-8")
    assert f"**chosen**: {SHORT_ANSWERS[0]}" in text and f"**rejected**: {CHATS[0][1]}" in text
    assert f"**after**: {SHORT_ANSWERS[0]}" in text


# ------------------------------------------------------------------------------------------------------ training

@pytest.mark.slow
def test_dpo_from_an_sft_run_gives_the_chosen_answers_and_leaves_the_run_untouched(trained_run, tmp_path):
    """On the tiny model plain sigmoid DPO only pushes the rejected answers down; DPO plus likelihood on the chosen
    ones (loss_type [sigmoid, sft]) makes them the greedy answers, which still stop at end-of-turn."""
    from ftkit.inference.loading import load_for_chat

    before = snapshot(trained_run)
    recipe = preference_recipe(tmp_path, trained_run, "dpo", "dpo", loss_type=["sigmoid", "sft"], beta=0.1)
    result = ftkit("train", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    assert snapshot(trained_run) == before  # the starting run is only read
    assert "pairs ranked right 100%" in result.stdout
    out = tmp_path / "dpo"
    model, _, chat_format = load_for_chat(out, None, None, None)
    assert_gives_chosen(model, chat_format)
    chat = ftkit("chat", "--adapter", str(out), "--system", SYSTEM, "--prompt", CHATS[1][0], "--greedy",
                 "--max-new-tokens", "200")
    assert chat.returncode == 0 and chat.stdout == SHORT_ANSWERS[1] + "\n"
    meta = json.loads((out / "ftkit_run.json").read_text())
    assert meta["method"] == "dpo" and meta["base_adapters"][0]["path"] == "base_adapters/0"
    assert (out / "base_adapters" / "0" / "adapter_model.safetensors").read_bytes() == \
        (trained_run / "adapter_model.safetensors").read_bytes()
    summary = json.loads((out / "train_summary.json").read_text())
    steps = summary["preference_per_step"]
    assert [s["step"] for s in steps] == list(range(10, 101, 10))
    assert steps[-1]["reward_accuracy"] == 1.0 and steps[-1]["reward_margin"] > steps[0]["reward_margin"]
    assert summary["final_rewards_chosen"] > summary["final_rewards_rejected"]


@pytest.mark.slow
def test_kto_from_an_sft_run_with_labelled_completions(trained_run, tmp_path):
    from ftkit.inference.loading import load_for_chat
    from ftkit.train.run import run_training

    before = snapshot(trained_run)
    pairs = preference_rows()
    rows = [{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in pairs] + \
           [{"prompt": r["prompt"], "completion": r["rejected"], "label": False} for r in pairs]
    out = run_training(load_recipe(preference_recipe(tmp_path, trained_run, "kto", "kto", rows)), log=QUIET)
    assert snapshot(trained_run) == before
    model, _, chat_format = load_for_chat(out, None, None, None)
    assert_gives_chosen(model, chat_format)
    assert "rewards_chosen" in json.loads((out / "train_summary.json").read_text())["preference_per_step"][-1]


@pytest.mark.slow
@pytest.mark.parametrize("method, extra", [("orpo", {}), ("simpo", {"cpo_alpha": 1.0})])
def test_reference_free_methods_from_the_base_model(tiny_model, tmp_path, method, extra):
    """ORPO, and SimPO with CPO's likelihood term (cpo_alpha 1; ftkit's simpo default is SimPO proper, 0), teach the
    base model the chosen answers."""
    from ftkit.inference.loading import load_for_chat
    from ftkit.train.run import run_training

    out = run_training(load_recipe(preference_recipe(tmp_path, tiny_model, method, method, max_steps=150, **extra)),
                       log=QUIET)
    model, _, chat_format = load_for_chat(out, None, None, None)
    assert_gives_chosen(model, chat_format)
    assert json.loads((out / "ftkit_run.json").read_text())["base_model"] == str(tiny_model)


@pytest.mark.slow
def test_full_dpo_with_precomputed_reference_log_probs(tiny_model, tmp_path):
    """Full fine-tuning with precompute_ref_log_probs: the reference pass runs before training (no frozen copy is
    kept), its progress bar does not reach the terminal, and the model learns the chosen answers."""
    from ftkit.inference.loading import load_for_chat

    recipe = preference_recipe(tmp_path, tiny_model, "full", "dpo", use_peft=False, precompute_ref_log_probs=True,
                               loss_type=["sigmoid", "sft"])
    result = ftkit("train", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Computing reference log probs" not in result.stdout + result.stderr
    model, _, chat_format = load_for_chat(None, tmp_path / "full", None, None)
    assert_gives_chosen(model, chat_format)


@pytest.mark.slow
@pytest.mark.xdist_group("port-29500")  # torchrun and accelerate default to the same port: one at a time
def test_two_process_dpo_with_the_cpu_launcher(trained_run, tmp_path):
    from ftkit.inference.loading import load_for_chat

    recipe = preference_recipe(tmp_path, trained_run, "dpo2", "dpo", loss_type=["sigmoid", "sft"],
                               per_device_train_batch_size=3)
    command = f"train {recipe} --launcher {ROOT / 'accelerate_configs' / 'cpu.yaml'} --num-processes 2"
    result = ftkit(*shlex.split(command))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("effective batch size: 3 per device x 2 process(es) x 1 accumulation = 6") == 1
    model, _, chat_format = load_for_chat(tmp_path / "dpo2", None, None, None)
    assert_gives_chosen(model, chat_format)


def test_combinations_the_trainers_would_refuse_after_loading_are_refused_first(tmp_path):
    path = recipe_text(tmp_path, "method: kto\nper_device_train_batch_size: 1\nuse_peft: true\nsync_ref_model: true\n"
                       "lora_target_modules: [q_proj, lm_head]\ntrain_on: all\n")
    found = problems(path)
    assert [line.split(": ")[1] for line in found] == ["'train_on'", "'sync_ref_model'", "'per_device_train_batch_size'",
                                                       "'lora_target_modules'"]
    path = recipe_text(tmp_path, "method: dpo\nloss_type: [sigmoid, sft]\nloss_weights: [1.0]\n")
    assert problems(path) == [f"{path}:6: 'loss_weights': gives 1 weight(s) for 2 loss_type(s); give one per loss"]


def test_preview_shows_chosen_and_rejected_side_by_side(tiny_model, tmp_path):
    recipe = preference_recipe(tmp_path, tiny_model, "preview", "dpo")
    result = ftkit("preview", str(recipe), "-n", "6", env={"COLUMNS": "160"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("chosen") >= 6 and result.stdout.count("rejected") >= 6
    for (_, answer), short in zip(CHATS, SHORT_ANSWERS):
        assert f"{short}<|im_end|>" in result.stdout
    stats = json.loads(ftkit("preview", str(recipe), "--json").stdout)
    assert stats["train_samples"] == len(CHATS) and 0 < stats["trained_fraction"] < 1


@pytest.mark.slow
def test_a_qlora_run_on_an_sft_run_merges_and_serves_as_one_model(trained_run, tiny_model, tmp_path):
    """QLoRA DPO on an SFT adapter run: the SFT adapter is merged in full precision into a temporary folder that is
    loaded in 4-bit and removed; the adapter records the raw base. merge folds base + SFT adapter + DPO adapter into
    one model that answers like the run; serve's vLLM line points at that route (vLLM would load the DPO adapter on
    the raw base)."""
    from ftkit.commands.serve import production_line
    from ftkit.inference.loading import load_for_chat
    from ftkit.train.run import run_training

    out = run_training(load_recipe(preference_recipe(tmp_path, trained_run, "dpo", "dpo", loss_type=["sigmoid", "sft"],
                                                     max_steps=60, load_in_4bit=True)), log=QUIET)
    assert not list(out.glob(".ftkit-tmp*"))
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model)
    assert json.loads((out / "ftkit_run.json").read_text())["quantization"]["load_in_4bit"] is True
    merged = ftkit("merge", "--adapter", str(out), "--output", str(tmp_path / "merged"))
    assert merged.returncode == 0, merged.stderr[-2000:]
    from ftkit.inference.generate import generate
    from tests.helpers import GREEDY

    run_model, _, run_format = load_for_chat(out, None, None, None)
    merged_model, _, merged_format = load_for_chat(None, tmp_path / "merged", None, None)
    for question, _ in CHATS:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        assert generate(merged_model, merged_format, messages, GREEDY) == generate(run_model, run_format, messages,
                                                                                   GREEDY)
    _, note = production_line(out, None, None, "dpo")
    assert "an earlier run's adapter merged in" in note and "ftkit merge" in note


def test_the_readme_preference_recipe_validates(tiny_model, tmp_path):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("# dpo.yml:", 1)[1].split("\n", 1)[1].split("```", 1)[0]
    recipe = yaml.safe_load(block)
    assert recipe["method"] == "dpo" and recipe["loss_type"] == ["sigmoid", "sft"]
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "pairs.jsonl", preference_rows())
    (tmp_path / "dpo.yml").write_text(block, encoding="utf-8")
    result = ftkit("validate", "dpo.yml", "--set", f"model_name_or_path={tiny_model}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("dpo.yml: ok (") and ", dpo, LoRA," in result.stdout


def test_ftkit_hands_trl_the_answers_trl_would_train_on_less_what_follows_end_of_turn(tiny_model, tmp_path):
    """Beside plain TRL: DPOTrainer tokenising the same conversational pairs itself gets the same prompt tokens and
    the same answers plus the template's text after <|im_end|> (ChatML's newline), which ftkit leaves untrained."""
    import datasets
    from trl import DPOConfig

    from ftkit.data.preference import PAIRED, normalise_row
    from ftkit.train.preference import trainer_classes

    data = prepared(tmp_path, tiny_model, preference_rows())
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows = [normalise_row(r, PAIRED, None) for r in preference_rows()]
    plain_rows = datasets.Dataset.from_list([{"prompt": r["prompt"], "chosen": [r["chosen"]],
                                              "rejected": [r["rejected"]]} for r in rows])
    _, trainer_class = trainer_classes("dpo")
    args = DPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, report_to="none")
    trainer = trainer_class(model=AutoModelForCausalLM.from_pretrained(tiny_model), args=args,
                            train_dataset=plain_rows, processing_class=tokenizer)
    theirs = {tuple(r["prompt_ids"]): r for r in trainer.train_dataset}  # TRL's own tokenisation (no prompt_ids given)
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    for ours in data.train:
        trl_row = theirs[tuple(ours["prompt_ids"])]
        assert trl_row["chosen_ids"] == ours["chosen_ids"] + newline
        assert trl_row["rejected_ids"] == ours["rejected_ids"] + newline
