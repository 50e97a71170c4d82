"""Scaling out: the accelerate configs, `ftkit train --launcher`, and 2-process data-parallel training on CPU.

FSDP and DeepSpeed cannot run here (no GPU, no deepspeed): their configs are loaded with accelerate's own
config classes and turned into the worker environment `accelerate launch` would set, and the FSDP/DeepSpeed
plugins are built from that environment.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ftkit.commands import launch
from ftkit.config import launch_plan
from ftkit.dist import LAUNCHED_ENV
from ftkit.config.recipe import load_recipe
from tests.helpers import ROOT, ftkit
from tests.helpers import assert_memorised, make_recipe

CONFIGS = ROOT / "accelerate_configs"
README = (ROOT / "README.md").read_text(encoding="utf-8")
CPU_COMMAND = "ftkit train recipe.yml --launcher accelerate_configs/cpu.yaml --num-processes 2"

# config -> (distributed_type, num_processes, use_cpu, extra fields that must hold)
EXPECTED = {
    "cpu.yaml": ("MULTI_GPU", 2, True, {}),
    "ddp.yaml": ("MULTI_GPU", 8, False, {}),
    "fsdp.yaml": ("FSDP", 8, False, {"fsdp_config": {"fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                                     "fsdp_reshard_after_forward": True,
                                                     "fsdp_state_dict_type": "FULL_STATE_DICT"}}),
    "deepspeed_zero2.yaml": ("DEEPSPEED", 8, False, {"deepspeed_config": {"zero_stage": 2}}),
    "deepspeed_zero3.yaml": ("DEEPSPEED", 8, False, {"deepspeed_config": {
        "zero_stage": 3, "zero3_init_flag": True, "zero3_save_16bit_model": True,
        "offload_optimizer_device": "none", "offload_param_device": "none"}}),
    "deepspeed_zero3_offload.yaml": ("DEEPSPEED", 8, False, {"deepspeed_config": {
        "zero_stage": 3, "offload_optimizer_device": "cpu", "offload_param_device": "cpu"}}),
    "multi_node_example.yaml": ("MULTI_GPU", 16, False, {"num_machines": 2, "machine_rank": 0,
                                                         "main_process_port": 29500}),
}


def test_every_config_is_covered():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


def worker_environment(config: Path) -> tuple[dict, object]:
    """What `accelerate launch --config_file config` would put in its workers' environment."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "-m", "ftkit", "train", "r.yml"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        return prepare_deepspeed_cmd_env(args)[1], args
    return prepare_multi_gpu_env(args), args


def kinds(*wanted: str) -> list[str]:
    return sorted(name for name, (kind, *_) in EXPECTED.items() if kind in wanted)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_with_accelerate(name):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    kind, processes, cpu, extra = EXPECTED[name]
    config = load_config_from_file(str(CONFIGS / name))
    assert isinstance(config, ClusterConfig)
    assert (str(config.distributed_type).split(".")[-1], config.num_processes, bool(config.use_cpu)) == (kind, processes, cpu)
    assert config.mixed_precision == "no"  # the recipe decides precision; a config value would override it
    for key, want in extra.items():
        got = getattr(config, key)
        got = {k: got.get(k) for k in want} if isinstance(want, dict) else got
        assert got == want, key
    plan = launch_plan.read_config(CONFIGS / name)  # ftkit's own reading agrees with accelerate's
    assert (plan.distributed_type, plan.num_processes) == (kind, processes)


@pytest.mark.parametrize("name", kinds("FSDP"))
def test_fsdp_config_builds_the_fsdp2_plugin(name):
    from accelerate.utils import FullyShardedDataParallelPlugin, patch_environment

    env, _ = worker_environment(CONFIGS / name)
    assert env["FSDP_VERSION"] == "2" and env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    with patch_environment(**env):
        fsdp = FullyShardedDataParallelPlugin()
        worker = launch_plan.plan_from_environment()
    assert fsdp.fsdp_version == 2 and fsdp.reshard_after_forward is True and fsdp.cpu_ram_efficient_loading
    assert (worker.fsdp_version, launch_plan.read_config(CONFIGS / name).fsdp_version) == (2, 2)


@pytest.mark.parametrize("name", kinds("DEEPSPEED"))
def test_deepspeed_configs_build_their_zero_plugin(name):
    from accelerate.utils import DeepSpeedPlugin, patch_environment

    ds_config = EXPECTED[name][3]["deepspeed_config"]
    stage = ds_config["zero_stage"]
    env, _ = worker_environment(CONFIGS / name)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == str(stage)
    with patch_environment(**env):
        ds = DeepSpeedPlugin()  # builds the DeepSpeed config dict without importing deepspeed
        worker = launch_plan.plan_from_environment()
    zero = ds.deepspeed_config["zero_optimization"]
    assert zero["stage"] == stage
    assert zero.get("offload_param", {}).get("device", "none") == ds_config.get("offload_param_device", "none")
    assert (worker.zero_stage, launch_plan.read_config(CONFIGS / name).zero_stage) == (stage, stage)


@pytest.mark.parametrize("name", kinds("MULTI_GPU"))
def test_data_parallel_configs_start_one_worker_per_process(name):
    _, args = worker_environment(CONFIGS / name)
    assert args.multi_gpu and not args.cpu  # torchrun with num_processes workers, not MULTI_CPU's single one


def readme_launches() -> list[tuple[str, str]]:
    """Each documented `ftkit train recipe.yml --launcher ...` line with the `# runs: accelerate launch ...` after it."""
    lines = [line.strip() for line in README.splitlines()]
    pairs = []
    for i, line in enumerate(lines):
        if line.startswith("ftkit train recipe.yml --launcher"):
            runs = lines[i + 1]
            assert runs.startswith("#   runs: accelerate launch "), f"README: no `runs:` line after {line!r}"
            pairs.append((line.split("  #")[0].strip(), runs.removeprefix("#   runs: ")))
    return pairs


def test_readme_scaling_commands_build_the_documented_accelerate_command(tiny_model, tmp_path, monkeypatch):
    """Without starting anything: each README command builds exactly the `accelerate launch` line shown."""
    from ftkit.cli import main

    pairs = readme_launches()
    documented = [command for command, _ in pairs]
    assert "ftkit train recipe.yml --launcher accelerate_configs/ddp.yaml --num-processes 8" in documented
    assert CPU_COMMAND in documented
    assert sum("multi_node_example.yaml --machine-rank" in c for c in documented) == 2
    (tmp_path / "accelerate_configs").symlink_to(CONFIGS)
    make_recipe(tmp_path, tiny_model, "recipe", output_dir="runs/recipe")  # tmp_path/recipe.yml
    monkeypatch.chdir(tmp_path)
    started = []
    monkeypatch.setattr(launch, "run", lambda argv, env=None: started.append((argv, env)) or 0)
    for command, accelerate_line in pairs:
        started.clear()
        with pytest.raises(SystemExit) as exited:
            main(shlex.split(command)[1:])
        assert exited.value.code == 0
        (argv, env), = started
        assert argv == launch.exec_argv(shlex.split(accelerate_line))
        assert argv[:3] == [sys.executable, "-m", "accelerate.commands.accelerate_cli"]
        assert env[LAUNCHED_ENV] == "1"
    # --set, --no-cache and --debug reach the workers
    started.clear()
    with pytest.raises(SystemExit):
        main(["--debug", "train", "recipe.yml", "--launcher", "accelerate_configs/ddp.yaml", "--set", "max_steps=5",
              "--no-cache"])
    assert started[0][0][3:] == ["launch", "--config_file", "accelerate_configs/ddp.yaml", "-m", "ftkit", "--debug",
                                 "train", "recipe.yml", "--set", "max_steps=5", "--no-cache"]


def raw_recipe(tiny_model: Path, **overrides) -> dict:
    return {"model_name_or_path": str(tiny_model), "use_peft": True, "dataset_mixer": {str(ROOT / "recipes/data/tiny_demo.jsonl"): 1.0},
            **overrides}


QLORA_OK = {"load_in_4bit": True, "bnb_4bit_quant_storage": "bfloat16", "dtype": "bfloat16", "bf16": True}


@pytest.mark.parametrize("config,overrides,error", [
    ("fsdp.yaml", QLORA_OK, None),
    ("deepspeed_zero3.yaml", QLORA_OK, None),
    ("deepspeed_zero3_offload.yaml", {**QLORA_OK, "dtype": None, "bf16": None}, None),  # bf16 by default on GPU
    ("ddp.yaml", {"load_in_4bit": True}, None),  # DDP and ZeRO-2 keep whole 4-bit copies: no storage rule
    ("deepspeed_zero2.yaml", {"load_in_8bit": True}, None),
    ("fsdp.yaml", {"load_in_4bit": True}, "bnb_4bit_quant_storage: QLoRA with FSDP2 needs the 4-bit weights stored "
     "in a float dtype that it can shard (got uint8, the default); set bnb_4bit_quant_storage: bfloat16 and "
     "dtype: bfloat16 (with bf16: true)"),
    ("deepspeed_zero3.yaml", {**QLORA_OK, "dtype": "float32"}, "bnb_4bit_quant_storage: QLoRA with DeepSpeed ZeRO-3 "
     "needs it equal to the weights' dtype; got bfloat16 with weights in float32; set dtype: bfloat16 and bf16: true"),
    ("deepspeed_zero3.yaml", {"load_in_8bit": True}, "load_in_8bit: 8-bit weights cannot be sharded by DeepSpeed "
     "ZeRO-3; use load_in_4bit with bnb_4bit_quant_storage (see accelerate_configs/README.md), or DDP / DeepSpeed "
     "ZeRO-2 (accelerate_configs/ddp.yaml, deepspeed_zero2.yaml)"),
])
def test_quantisation_and_sharding_combinations(tiny_model, config, overrides, error):
    recipe = load_recipe(None, raw={k: v for k, v in raw_recipe(tiny_model, **overrides).items() if v is not None})
    assert launch_plan.check_plan(recipe, launch_plan.read_config(CONFIGS / config)) == ([error] if error else [])


def test_multi_cpu_config_is_refused(tiny_model, tmp_path):
    config = tmp_path / "multi_cpu.yaml"
    config.write_text(yaml.safe_dump({"distributed_type": "MULTI_CPU", "num_processes": 2, "use_cpu": True}))
    problems = launch_plan.check_plan(load_recipe(None, raw=raw_recipe(tiny_model)), launch_plan.read_config(config))
    assert len(problems) == 1 and "starts a single process" in problems[0] and "use_cpu: true" in problems[0]


def test_bad_recipe_with_launcher_prints_one_error_and_starts_no_worker(tiny_model, tmp_path):
    typo = make_recipe(tmp_path, tiny_model, "typo", learning_rat=1e-3)
    result = ftkit("train", str(typo), "--launcher", "accelerate_configs/cpu.yaml", "--num-processes", "2")
    assert result.returncode == 2
    lineno = typo.read_text().splitlines().index("learning_rat: 0.001") + 1
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        f"ftkit: error: {typo}:{lineno}: unknown key 'learning_rat' (did you mean 'learning_rate'? see: ftkit keys learning_rate)"]
    assert "launching" not in result.stderr + result.stdout
    qlora = make_recipe(tmp_path, tiny_model, "qlora", load_in_4bit=True)
    result = ftkit("train", str(qlora), "--launcher", "accelerate_configs/fsdp.yaml")
    assert result.returncode == 2 and "launching" not in result.stderr
    assert result.stderr.splitlines() == [f"ftkit: error: {launch_plan.check_plan(load_recipe(qlora), launch_plan.read_config(CONFIGS / 'fsdp.yaml'))[0]}"]
    missing = ftkit("train", str(qlora), "--launcher", "nowhere.yaml")
    assert missing.returncode == 2 and missing.stderr.splitlines() == [
        "ftkit: error: --launcher: accelerate config 'nowhere.yaml' does not exist (see accelerate_configs/)"]


STUB = """
import signal, sys, time
from pathlib import Path
mark = Path(sys.argv[1])
signal.signal(signal.SIGTERM, lambda *a: (mark.write_text('SIGTERM'), sys.exit(7)))
print('ready', flush=True)
time.sleep(30)
sys.exit(3)
"""


def test_launcher_forwards_signals_and_exit_status(tmp_path):
    """The launcher's child (accelerate, here a stand-in) gets SIGTERM sent to ftkit, and its status is ftkit's."""
    assert launch.run([sys.executable, "-c", "import sys; sys.exit(3)"]) == 3
    mark = tmp_path / "mark"
    parent = subprocess.Popen([sys.executable, "-c", "import sys; from ftkit.commands.launch import run; "
                               f"sys.exit(run([sys.executable, '-c', {STUB!r}, {str(mark)!r}]))"],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert parent.stdout.readline().strip() == "ready"
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=20) == 7
    assert mark.read_text() == "SIGTERM"


@pytest.mark.slow
@pytest.mark.xdist_group("port-29500")  # torchrun and accelerate default to the same port: one at a time
def test_two_processes_through_the_launcher_train_like_one(tiny_model, tmp_path):
    """The README's CPU command: 2 data-parallel processes (gloo) memorise like one, write once, report the batch."""
    from ftkit.inference.loading import load_for_chat

    (tmp_path / "accelerate_configs").symlink_to(CONFIGS)
    make_recipe(tmp_path, tiny_model, "recipe", output_dir="runs/recipe", per_device_train_batch_size=4,
                gradient_accumulation_steps=2, max_steps=100)  # tmp_path/recipe.yml
    assert CPU_COMMAND in README
    bars = {"HF_DATASETS_DISABLE_PROGRESS_BARS": "0"}  # on even without a terminal: each tokenisation shows one
    result = ftkit(*shlex.split(CPU_COMMAND)[1:], cwd=tmp_path, env=bars)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "runs" / "recipe"
    lines = result.stdout.splitlines()
    assert sum(line.startswith("done: 100 steps") for line in lines) == 1
    assert lines.count("effective batch size: 4 per device x 2 process(es) x 2 accumulation = 16; "
                       "precision float32 weights on cpu") == 1
    for once in ("data: 7 train", "trainable parameters:", "tokenised 7 conversations", "next: ftkit chat"):
        assert sum(line.startswith(once) for line in lines) == 1, once
    assert result.stderr.count("launching: accelerate launch") == 1
    assert result.stderr.count("Tokenising: 100%") == 1  # only the main process tokenised; the other read the cache
    cache = Path(os.environ["FTKIT_CACHE"]) / "tokenized"
    assert not list(cache.glob("*.tmp*"))
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == 100 and summary["final_train_loss"] < 0.01 * summary["first_train_loss"]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == []
    model, _, chat_format = load_for_chat(out, None, None, None)
    assert_memorised(model, chat_format)
