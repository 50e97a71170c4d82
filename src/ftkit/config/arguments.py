"""The recipe's keys that ftkit owns, as dataclasses; `help` metadata is the reference documentation.

Model keys mirror TRL's `ModelConfig` (a test checks that every one of its fields is here), data keys
mirror alignment-handbook's `ScriptArguments`. Every other key belongs to the TRL config of the recipe's
`method`: `SFTConfig` (`sft_schema.json`), or `DPOConfig`, `KTOConfig`, `ORPOConfig`, `CPOConfig` (SimPO)
(`preference_schema.json`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Local directory or Hugging Face Hub id of the base model (required)."}
    )
    model_revision: str = field(default="main", metadata={"help": "Hub branch, tag or commit of the model."})
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer to use when it differs from the model's (e.g. one with ChatML tokens)."}
    )
    dtype: str | None = field(
        default=None,
        metadata={
            "help": "Weights dtype: auto, bfloat16, float16 or float32. Default: bfloat16 on GPUs that support it, "
            "else float32. Also the 4-bit compute dtype unless bnb_4bit_compute_dtype is set.",
            "choices": ["auto", "bfloat16", "float16", "float32"],
        },
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention kernel: eager, sdpa, flash_attention_2, or a kernels-hub id."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run the model repository's own Python code. Only for repositories you trust."}
    )
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of every weight."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input, in [0, 1)."})
    lora_target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names to adapt, or 'all-linear'. Default: all-linear."}
    )
    lora_target_parameters: list[str] | None = field(
        default=None, metadata={"help": "Parameter names to adapt directly (e.g. MoE expert weights)."}
    )
    lora_modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full and saved with the adapter, e.g. embed_tokens, lm_head."}
    )
    lora_task_type: str = field(default="CAUSAL_LM", metadata={"help": "PEFT task type.", "choices": ["CAUSAL_LM"]})
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised LoRA: scale by alpha / sqrt(r)."})
    use_dora: bool = field(default=False, metadata={"help": "Weight-decomposed LoRA (DoRA)."})
    load_in_8bit: bool = field(default=False, metadata={"help": "Load the base weights in 8-bit (bitsandbytes)."})
    load_in_4bit: bool = field(default=False, metadata={"help": "Load the base weights in 4-bit (QLoRA, bitsandbytes)."})
    bnb_4bit_quant_type: str = field(
        default="nf4", metadata={"help": "4-bit data type.", "choices": ["nf4", "fp4"]}
    )
    use_bnb_nested_quant: bool = field(default=False, metadata={"help": "Double quantisation of the 4-bit scales."})
    bnb_4bit_quant_storage: str | None = field(
        default=None, metadata={"help": "Storage dtype of packed 4-bit weights (set to the model dtype for FSDP)."}
    )
    bnb_4bit_compute_dtype: str | None = field(
        default=None,
        metadata={
            "help": "Compute dtype of 4-bit layers. Default: the training precision (bfloat16 with bf16: true).",
            "choices": ["bfloat16", "float16", "float32"],
        },
    )


@dataclass
class DataArguments:
    dataset_mixer: dict[str, float] | None = field(
        default=None,
        metadata={"help": "Sources and weights: a weight <= 1 is a fraction of the source, > 1 a number of rows."},
    )
    dataset_mixture: dict[str, Any] | list | None = field(
        default=None,
        metadata={
            "help": "alignment-handbook's current form: a list of {id, config, split, columns, weight}, or a mapping "
            "with that list under `datasets` plus `seed` and `test_split_size`."
        },
    )
    dataset_name: str | None = field(default=None, metadata={"help": "A single dataset (TRL's key): hub id or local path."})
    dataset_config: str | None = field(default=None, metadata={"help": "Config (subset) name of dataset_name."})
    dataset_configs: list[str] | None = field(
        default=None, metadata={"help": "Config names, one per dataset_mixer entry (alignment-handbook)."}
    )
    dataset_splits: list[str] | None = field(
        default=None, metadata={"help": "Splits to load; a name containing 'test' is the eval split. Default: train."}
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Train split name for dataset_name."})
    dataset_test_split: str | None = field(default=None, metadata={"help": "Eval split name for dataset_name."})
    test_split_size: float | None = field(
        default=None,
        metadata={"help": "Carve an eval split off the training rows (fraction < 1 or a count) when none is given."},
    )
    chat_template: str | None = field(
        default=None,
        metadata={
            "help": "A built-in template name (chatml, llama3, gemma, llama2, alpaca), a path to a Jinja file, or "
            "inline Jinja. Default: the tokenizer's own, else alpaca (needs no new tokens). Saved with the output."
        },
    )
    chat_template_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "Variables for the chat template in every rendering: training, preview, before/after "
                  "samples, and chat/predict/serve of the run (it is recorded there), e.g. {enable_thinking: false}. "
                  "A row's own chat_template_kwargs column adds to these."},
    )
    system_prompt: str | None = field(default=None, metadata={"help": "System message added to samples that have none."})
    train_on: str = field(
        default="assistant",
        metadata={
            "help": "Which tokens carry loss: every assistant turn with its end-of-turn token (assistant), only the "
            "last assistant turn (last_assistant), or every token (all).",
            "choices": ["assistant", "last_assistant", "all"],
        },
    )
    on_bad_rows: str = field(
        default="error",
        metadata={"help": "A malformed row stops the run (error) or is skipped and counted (skip).", "choices": ["error", "skip"]},
    )
    overlong: str = field(
        default="truncate",
        metadata={"help": "Samples longer than max_length are cut (truncate) or left out (drop); both are counted.",
                  "choices": ["truncate", "drop"]},
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "Read and tokenise rows lazily while training (data larger than RAM); needs max_steps. "
                  "No token cache; eval split: the first test_split_size rows."},
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes used to tokenise the data (datasets.map num_proc)."}
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={"help": "Preference methods: the longest prompt in tokens; a longer one keeps its last tokens (those "
                  "nearest the answer), then prompt + answer are cut to max_length. Older TRL's key, which TRL 1.16 "
                  "dropped; ftkit applies it itself."},
    )
    auto_insert_empty_system_msg: bool = field(
        default=False, metadata={"help": "Insert an empty system turn where a sample has none (alignment-handbook)."}
    )


@dataclass
class RunArguments:
    method: str = field(
        default="sft",
        metadata={"help": "Training method: sft (supervised), or preference optimisation on chosen/rejected answers: "
                  "dpo, kto (labelled completions), orpo, simpo (reference-free), cpo. Also read from axolotl's `rl` "
                  "and LLaMA-Factory's `stage`. Without it, a recipe with a key only preference trainers have (beta, "
                  "a DPO loss_type, max_prompt_length) is dpo.",
                  "choices": ["sft", "dpo", "kto", "orpo", "simpo", "cpo"]},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Allow training into an output_dir that already holds a finished run. Off: ftkit refuses."},
    )
    eval_samples: int | None = field(
        default=None,
        metadata={"help": "Eval prompts answered greedily before and after training, written to samples.md and "
                  "scored in train_summary.json. Default: 5 when there is an eval split, else 0."},
    )
    eval_samples_max_new_tokens: int = field(
        default=256, metadata={"help": "Most tokens generated per before/after answer."}
    )
    wandb_entity: str | None = field(default=None, metadata={"help": "Weights & Biases entity (sets WANDB_ENTITY)."})
    wandb_project: str | None = field(default=None, metadata={"help": "Weights & Biases project (sets WANDB_PROJECT)."})
    wandb_run_group: str | None = field(default=None, metadata={"help": "Weights & Biases group (sets WANDB_RUN_GROUP)."})
    early_stopping_patience: int | None = field(
        default=None,
        metadata={"help": "Stop after this many evaluations without improvement of metric_for_best_model (default "
                  "eval_loss) and restore the best checkpoint; needs eval_strategy steps or epoch and an eval split. "
                  "Sets load_best_model_at_end: true and saves a checkpoint at every evaluation."},
    )
    early_stopping_threshold: float | None = field(
        default=None,
        metadata={"help": "Least improvement of the metric that counts as one, for early_stopping_patience. Default 0."},
    )
