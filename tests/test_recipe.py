"""Recipe parsing: alignment-handbook/TRL keys, renamed keys, and errors a person can act on."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from ftkit.config.arguments import DataArguments, ModelArguments, RunArguments
from ftkit.errors import FtkitError
from ftkit.config.recipe import load_recipe
from ftkit.config.schema import sft_schema
from tests.helpers import ROOT, ftkit


def write(tmp_path: Path, text: str, name: str = "r.yml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.fixture
def data_file(tmp_path) -> Path:
    path = tmp_path / "d.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n')
    return path


def base(tmp_path, data_file, extra: str = "") -> Path:
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "model" / "config.json").write_text("{}", encoding="utf-8")
    return write(tmp_path, f"model_name_or_path: {tmp_path / 'model'}\ndataset_mixer:\n  {data_file}: 1.0\n{extra}")


def problems(path: Path, overrides=None) -> list[str]:
    with pytest.raises(FtkitError) as err:
        load_recipe(path, overrides or [])
    return err.value.lines


def test_seed_000_recipe_parses_unchanged_with_notes():
    recipe = load_recipe(ROOT / "recipes" / "gemma2b_yue_alpaca_lora.yml")
    assert recipe.model.model_name_or_path == "google/gemma-2b"
    assert recipe.model.dtype == "bfloat16"  # torch_dtype renamed
    assert recipe.model.lora_modules_to_save == ["embed_tokens", "lm_head"]
    assert recipe.sft["max_length"] == 2048  # max_seq_length renamed
    assert recipe.sft["warmup_steps"] == 0.1  # warmup_ratio: a float < 1 is a ratio in transformers 5
    assert recipe.data.dataset_splits == ["train_sft", "test_sft"]
    assert recipe.data.preprocessing_num_workers == 12
    assert recipe.run.overwrite_output_dir is True
    assert recipe.sft["report_to"] == ["tensorboard", "wandb"]
    notes = "\n".join(recipe.notes)
    assert "'torch_dtype' is deprecated; renamed to 'dtype'" in notes
    assert "'max_seq_length' is deprecated; renamed to 'max_length'" in notes
    assert "add_special_tokens/append_concat_token" in notes


def test_every_recipe_in_recipes_validates(tiny_model):
    for path in sorted((ROOT / "recipes").glob("*.yml")):
        built = ["--set", f"model_name_or_path={tiny_model}"] if path.name == "tiny-demo.yml" else []  # models/tiny
        result = ftkit("validate", str(path), *built)
        assert result.returncode == 0, f"{path.name}: {result.stderr}"
        assert "ok" in result.stdout


def test_unknown_key_names_file_line_and_suggestion(tmp_path, data_file):
    path = base(tmp_path, data_file, "learning_rat: 0.1\n")
    result = ftkit("validate", str(path))
    assert result.returncode == 2
    assert result.stderr.strip() == f"ftkit: error: {path}:4: unknown key 'learning_rat' (did you mean 'learning_rate'? see: ftkit keys learning_rate)"
    assert "Traceback" not in result.stderr


def test_all_problems_reported_at_once(tmp_path, data_file):
    path = base(tmp_path, data_file, "lora_r: abc\nlr_scheduler_type: cosin\nbf16: true\nfp16: true\nnum_train_epoch: 2\n")
    lines = problems(path)
    assert f"{path}:4: 'lora_r': expected int, got str 'abc'" in lines
    assert any(line.startswith(f"{path}:5: 'lr_scheduler_type': 'cosin' is not one of") and "did you mean 'cosine'" in line
               for line in lines)
    assert f"{path}:8: unknown key 'num_train_epoch' (did you mean 'num_train_epochs'? see: ftkit keys num_train_epochs)" in lines
    assert any("'bf16': bf16 and fp16 are exclusive" in line for line in lines)
    assert len(lines) == 4


def test_missing_model_path_is_one_line_exit_2(tmp_path, data_file):
    path = write(tmp_path, f"model_name_or_path: ./models/missing\ndataset_mixer:\n  {data_file}: 1\n")
    result = ftkit("validate", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"ftkit: error: {path}:1: 'model_name_or_path': './models/missing' is not a directory "
        "(for a hub model use its id, e.g. google/gemma-2b)"
    ]


def test_missing_recipe_and_bad_yaml(tmp_path):
    assert problems(tmp_path / "nope.yml") == [f"{tmp_path / 'nope.yml'}: recipe file not found"]
    bad = write(tmp_path, "a: 1\nb: [1, 2\n")
    assert problems(bad)[0].startswith(f"{bad}:")
    assert "not valid YAML" in problems(bad)[0]


def test_set_overrides_are_typed_and_checked(tmp_path, data_file):
    path = base(tmp_path, data_file)
    recipe = load_recipe(path, ["learning_rate=2e-4", "num_train_epochs=2", "lora_target_modules=[q_proj, v_proj]"])
    assert recipe.sft["learning_rate"] == pytest.approx(2e-4)
    assert recipe.sft["num_train_epochs"] == 2.0
    assert recipe.model.lora_target_modules == ["q_proj", "v_proj"]
    assert problems(path, ["learnin_rate=1"]) == ["--set learnin_rate: unknown key 'learnin_rate' (did you mean 'learning_rate'? see: ftkit keys learning_rate)"]
    assert problems(path, ["oops"]) == ["--set 'oops': expected KEY=VALUE, e.g. --set learning_rate=2e-4"]


def test_yaml_strings_for_numbers_are_accepted(tmp_path, data_file):
    recipe = load_recipe(base(tmp_path, data_file, "learning_rate: 1e-4\nmax_steps: '10'\n"))
    assert recipe.sft["learning_rate"] == pytest.approx(1e-4) and recipe.sft["max_steps"] == 10


def test_yaml_no_for_a_strategy_means_the_string_no(tmp_path, data_file):
    """YAML 1.1 reads an unquoted `no` as false; for a string key like save_strategy the user meant "no"."""
    recipe = load_recipe(base(tmp_path, data_file, "save_strategy: no\neval_strategy: off\n"), ["logging_strategy=no"])
    assert (recipe.sft["save_strategy"], recipe.sft["logging_strategy"]) == ("no", "no")
    assert problems(base(tmp_path, data_file, "eval_strategy: yes\n"))[0].endswith(
        "'eval_strategy': 'yes' is not one of: no, steps, epoch")


def test_each_key_has_exactly_one_owner():
    sections = [set(f.name for f in dataclasses.fields(c)) for c in (ModelArguments, DataArguments, RunArguments)]
    sft = set(sft_schema())
    for i, keys in enumerate(sections):
        assert not keys & sft, keys & sft
        for other in sections[i + 1:]:
            assert not keys & other


def test_trl_model_config_keys_are_all_accepted():
    from trl import ModelConfig

    ours = {f.name for f in dataclasses.fields(ModelArguments)}
    missing = {f.name for f in dataclasses.fields(ModelConfig)} - ours - {"dtype"}
    assert not missing


def test_sft_schema_snapshot_matches_installed_trl():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_sft_schema.py"), "--check"])
    assert result.returncode == 0, "run scripts/gen_sft_schema.py after upgrading trl"


def test_resolved_recipe_has_no_secrets_and_round_trips(tmp_path, data_file):
    recipe = load_recipe(base(tmp_path, data_file, "hub_token: hf_secret\nlearning_rate: 0.001\n"))
    saved = recipe.to_dict()
    assert "hub_token" not in saved and "hf_secret" not in yaml.safe_dump(saved)
    again = load_recipe(None, raw=yaml.safe_load(yaml.safe_dump(saved)))
    assert again.sft["learning_rate"] == 0.001 and again.model == recipe.model


def test_validate_and_help_do_not_import_torch():
    for args in (["--help"], ["validate", str(ROOT / "recipes" / "tiny-demo.yml")]):
        result = subprocess.run([sys.executable, "-X", "importtime", "-m", "ftkit", *args], cwd=ROOT,
                                capture_output=True, text=True)
        imported = [line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line]
        assert not [m for m in imported if m.split(".")[0] in ("torch", "transformers", "trl", "datasets")], args


def test_duplicate_key_is_an_error(tmp_path, data_file):
    path = base(tmp_path, data_file, "learning_rate: 0.1\nlearning_rate: 0.2\n")
    assert problems(path) == [f"{path}:5: key 'learning_rate' is given twice (first on line 4); keep one"]


def test_every_recipe_previews_with_the_tiny_tokenizer_standing_in(tiny_model):
    """Each seed recipe's own data, formats, column mappings and template go through preview; recipes whose
    data lives on the hub fail with one clear line (no network here)."""
    for path in sorted((ROOT / "recipes").glob("*.yml")):
        result = ftkit("preview", str(path), "--json", "--set", f"model_name_or_path={tiny_model}",
                       "--set", "tokenizer_name_or_path=null", env={"HF_HUB_OFFLINE": "1"})
        hub_data = "gemma2b" in path.name  # deita-10k and yue-alpaca-chat are hub datasets
        if hub_data:
            assert result.returncode == 2 and "Traceback" not in result.stderr, path.name
            assert "could not be loaded" in result.stderr.strip().splitlines()[-1], path.name
        else:
            assert result.returncode == 0, f"{path.name}: {result.stderr[-1500:]}"
            stats = json.loads(result.stdout)
            assert stats["train_samples"] > 0 and 0 < stats["trained_fraction"] < 1, path.name


def test_report_to_list_matches_transformers():
    """checks.REPORT_TO is a copy (importing transformers' integrations imports torch); it must stay in step."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    from ftkit.config.checks import REPORT_TO

    assert sorted(REPORT_TO) == sorted(INTEGRATION_TO_CALLBACK)



def test_seed_zero_is_a_seed(tmp_path, data_file):
    """`seed: 0` once fell through an `or` chain to 42 in data sampling."""
    from ftkit.config.sources import data_seed

    assert data_seed(load_recipe(base(tmp_path, data_file, "seed: 0\n"))) == 0
    assert data_seed(load_recipe(base(tmp_path, data_file, "seed: 5\ndata_seed: 0\n"))) == 0
    assert data_seed(load_recipe(base(tmp_path, data_file))) == 42  # TRL's default, read from the schema


def test_loss_options_trl_has_renamed_or_cannot_run_here(tmp_path, data_file):
    recipe = load_recipe(base(tmp_path, data_file, "loss_type: chunked_nll\n"))
    assert recipe.sft["loss_type"] == "nll"
    assert any("loss_type 'chunked_nll' is older TRL's name; renamed to 'nll'" in note for note in recipe.notes)
    found = problems(base(tmp_path, data_file, "use_liger_kernel: true\n"))
    assert found == [f"{tmp_path / 'r.yml'}:4: 'use_liger_kernel': needs the liger-kernel package (pip install "
                     "liger-kernel), whose Triton kernels run on CUDA GPUs only; or set use_liger_kernel: false"]
    found = problems(base(tmp_path, data_file, "model_init_kwargs: {dtype: float16, use_kernels: true}\n"))
    assert found == [f"{tmp_path / 'r.yml'}:4: 'model_init_kwargs': 'dtype' is set by the recipe key dtype; set it "
                     "there instead"]
