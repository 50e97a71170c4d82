"""The recipe's data model: every key with its owner, accepted YAML kinds and choices, the names older
recipes use, and the parsed `Recipe` itself. Reading and checking a YAML file is recipe.py's job."""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from ftkit.config.arguments import DataArguments, ModelArguments, RunArguments

# Old names still found in published recipes -> current name. Accepted with a one-line note.
RENAMED = {
    "torch_dtype": "dtype",
    "max_seq_length": "max_length",
    "evaluation_strategy": "eval_strategy",
    "warmup_ratio": "warmup_steps",  # transformers 5: a float in [0, 1) is a ratio of the total steps
    "no_cuda": "use_cpu",
    "chat_template_path": "chat_template",
    "dataset_num_proc": "preprocessing_num_workers",
    "use_flash_attention_2": "attn_implementation",
    "dataset_streaming": "streaming",
}
# Old values of a key -> current value (alignment-handbook's SmolLM3 recipes say ffd). Accepted with a note.
RENAMED_VALUES = {"packing_strategy": {"ffd": "bfd", "bfd-requeue": "bfd_split"},
                  "loss_type": {"chunked_nll": "nll"}}  # TRL 1.16: nll is computed chunked already
# Keys that transformers 5 / TRL 1 removed and that have no effect any more; accepted with a note.
IGNORED = {
    "logging_dir": "TensorBoard logs go to output_dir/runs",
    "save_safetensors": "ftkit always saves safetensors",
    "hub_model_revision": "pushes go to the default branch",
}
# SFTConfig keys ftkit implements itself (masking, templates, tokenising) and does not pass to TRL.
HANDLED_SFT_KEYS = {"assistant_only_loss", "completion_only_loss", "dataset_text_field", "eos_token", "pad_token",
                    "model_init_kwargs"}  # ftkit loads the model itself, so TRL would ignore model_init_kwargs
# from_pretrained arguments that recipe keys own; model_init_kwargs may not set them a second time.
MODEL_INIT_OWNED = {"dtype": "dtype", "torch_dtype": "dtype", "attn_implementation": "attn_implementation",
                    "revision": "model_revision", "trust_remote_code": "trust_remote_code",
                    "quantization_config": "load_in_4bit / load_in_8bit", "device_map": "(set by ftkit per process)"}
# Values TrainingArguments types too narrowly: Trainer.train(resume_from_checkpoint=True) resumes the latest.
EXTRA_KINDS = {"resume_from_checkpoint": ["bool"]}
SECRET_PATTERN = re.compile(r"(token|secret|password|api_key)$")
INT64 = 2**63
SECTIONS = {"model": ModelArguments, "data": DataArguments, "run": RunArguments}
# method -> the TRL config whose fields it takes (a snapshot in preference_schema.json); SimPO is CPO's simpo loss.
METHOD_CONFIGS = {"sft": "SFTConfig", "dpo": "DPOConfig", "kto": "KTOConfig", "orpo": "ORPOConfig",
                  "simpo": "CPOConfig", "cpo": "CPOConfig"}
PREFERENCE_METHODS = ("dpo", "kto", "orpo", "simpo", "cpo")
# Peers' names for `method` (axolotl rl, LLaMA-Factory stage); read as method with a one-line note.
METHOD_ALIASES = {"rl": "axolotl", "stage": "LLaMA-Factory", "trainer": "trainer"}
# Keys no TRL config has any more that only preference recipes carry; they make ftkit infer method dpo.
PREFERENCE_DATA_KEYS = ("max_prompt_length",)


def _own_fields(fields: dict) -> dict:
    """A config's fields less those ftkit owns (one owner per key: ours wins) and old names it renames."""
    ours = {name for cls in SECTIONS.values() for name in cls.__dataclass_fields__}
    return {k: v for k, v in fields.items() if k not in RENAMED and k not in IGNORED and k not in ours}


@lru_cache(maxsize=1)
def sft_schema() -> dict[str, dict]:
    """SFTConfig's fields, from the snapshot scripts/gen_sft_schema.py wrote (no trl import)."""
    text = (Path(__file__).parent / "sft_schema.json").read_text(encoding="utf-8")
    return _own_fields(json.loads(text)["fields"])


@lru_cache(maxsize=None)
def method_schema(method: str = "sft") -> dict[str, dict]:
    """The fields of the TRL config a method trains with, from the snapshots (no trl import)."""
    if method == "sft":
        return sft_schema()
    text = (Path(__file__).parent / "preference_schema.json").read_text(encoding="utf-8")
    entry = json.loads(text)["methods"]["cpo" if method == "simpo" else method]
    sft_raw = json.loads((Path(__file__).parent / "sft_schema.json").read_text(encoding="utf-8"))["fields"]
    fields = {name: sft_raw[name] for name in entry["shared_with_sft"]} | entry["fields"]
    if method == "simpo":  # CPOConfig's loss_type chooses SimPO's loss; ftkit's method default sets it
        fields["loss_type"] = {**fields["loss_type"], "default": "simpo", "choices": ["simpo", "alphapo"]}
    return _own_fields(fields)


def yaml_kinds(tp) -> list[str]:
    """The YAML value kinds (bool, int, float, str, list, dict, null) an annotation accepts."""
    if isinstance(tp, str):
        tp = eval(tp, vars(typing) | {"Any": Any})  # noqa: S307 - our own annotations only
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return sorted({kind for arg in typing.get_args(tp) for kind in yaml_kinds(arg)})
    if tp is type(None):
        return ["null"]
    if tp is Any:
        return ["bool", "dict", "float", "int", "list", "null", "str"]
    if tp in (bool, int, float, str):
        return [tp.__name__]
    if tp in (list, tuple) or origin in (list, tuple):
        return ["list"]
    if tp is dict or origin is dict:
        return ["dict"]
    return ["object"]


@lru_cache(maxsize=None)
def key_table(method: str = "sft") -> dict[str, tuple[str, list[str], list | None]]:
    """Every valid key of a method's recipe -> (owner section, accepted kinds, choices). Trainer config keys are
    owned by section "sft" whatever the method (Recipe.sft holds them)."""
    table: dict[str, tuple[str, list[str], list | None]] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            table[f.name] = (section, yaml_kinds(f.type), f.metadata.get("choices"))
    for name, spec in method_schema(method).items():
        table.setdefault(name, ("sft", spec["kinds"] + EXTRA_KINDS.get(name, []), spec["choices"]))
    return table


def methods_with_key(key: str) -> list[str]:
    """The methods whose trainer config has `key` (for "belongs to method X" messages)."""
    return [m for m in METHOD_CONFIGS if key in method_schema(m)]


@dataclass
class Recipe:
    model: ModelArguments
    data: DataArguments
    run: RunArguments
    sft: dict[str, Any]  # the method's trainer config keys the recipe sets (SFTConfig, DPOConfig, ...), checked
    path: Path | None = None
    notes: list[str] = field(default_factory=list)

    def output_dir(self) -> Path:
        out = self.sft.get("output_dir")
        stem = self.path.stem if self.path else "run"
        return Path(out) if out else Path("runs") / stem

    @property
    def method(self) -> str:
        return self.run.method

    def sft_value(self, key: str) -> Any:
        """The recipe's value of a trainer config key, else TRL's own default for this method (from the snapshot)."""
        return self.sft[key] if key in self.sft else method_schema(self.method)[key]["default"]

    def checkpointing(self) -> bool | None:
        """Gradient checkpointing under either name (transformers 5.23 renamed it activation_checkpointing);
        None when the recipe leaves it to ftkit (train/defaults.py decides once the device is known)."""
        for key in ("activation_checkpointing", "gradient_checkpointing"):
            if self.sft.get(key) is not None:
                return bool(self.sft[key])
        return None

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved recipe, secrets left out, ready to save as ftkit_recipe.yml."""
        resolved: dict[str, Any] = {}
        for section in (self.model, self.data, self.run):
            resolved.update(dataclasses.asdict(section))
        resolved.update(self.sft)
        resolved.setdefault("output_dir", str(self.output_dir()))
        return {k: v for k, v in resolved.items() if not SECRET_PATTERN.search(k)}
