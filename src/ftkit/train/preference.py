"""Preference trainers: TRL's DPOTrainer, KTOTrainer and (trl.experimental) ORPOTrainer / CPOTrainer (SimPO is CPO's
simpo loss) on ftkit's pre-tokenised data, with the reference model the method needs.

Library gap: none of these trainers accepts token ids. DPO and KTO tokenise in `_prepare_dataset` (rendering prompt
and prompt+answer through the chat template and training on everything after their common prefix, template text
after the end-of-turn token included); ORPO and CPO in `tokenize_row`. The subclasses below hand over ftkit's ids
instead (data/preference.py: an answer's trained tokens are its text and the end-of-turn token, nothing else) and
leave every loss, metric and reference computation to TRL.

Reference model: with LoRA, the policy's new adapter disabled (ftkit passes the LoRA config to DPO/KTO, so TRL
wraps the model itself and computes reference log-probs with the adapter off; a model wrapped beforehand would get a
second "ref" adapter copy instead); with full fine-tuning, a frozen copy of the starting weights, or none with
precompute_ref_log_probs. ORPO and SimPO need no reference.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

from ftkit.errors import FtkitError

REFERENCE_FREE = ("orpo", "simpo", "cpo")
FIGURES = {"rewards/chosen": "rewards_chosen", "rewards/rejected": "rewards_rejected",
           "rewards/margins": "reward_margin", "rewards/accuracies": "reward_accuracy"}


def trainer_classes(method: str):
    """-> (config class, trainer class) of TRL for a method, subclassed to take ftkit's token ids."""
    if method in ("dpo", "kto"):
        from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

        config, base = (DPOConfig, DPOTrainer) if method == "dpo" else (KTOConfig, KTOTrainer)
        return config, type(f"Ftkit{base.__name__}", (PretokenisedMixin, base), {})
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # ORPO and CPO live in trl.experimental in TRL 1.16
    if method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOConfig, type("FtkitORPOTrainer", (PairRowsMixin, ORPOTrainer), {})
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    return CPOConfig, type("FtkitCPOTrainer", (PairRowsMixin, CPOTrainer), {})


class PretokenisedMixin:
    """DPO/KTO: ftkit's prompt_ids/chosen_ids/rejected_ids (or completion_ids/label) replace TRL's tokenisation;
    KTO's mismatched KL completions are still added as TRL does (each completion paired with the next prompt of its
    batch)."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if "prompt_ids" not in dataset.column_names:
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if getattr(self, "calculate_KL", False):
            def rotate(batch):
                batch["KL_completion_ids"] = [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]
                return batch

            dataset = dataset.map(rotate, batched=True, batch_size=args.per_device_train_batch_size)
        return dataset


class PairRowsMixin:
    """ORPO/CPO: one pre-tokenised pair -> the chosen_/rejected_/prompt_ columns their collator pads."""

    def tokenize_row(self, feature, model=None) -> dict:
        prompt, out = feature["prompt_ids"], {}
        out["prompt_input_ids"], out["prompt_attention_mask"] = prompt, [1] * len(prompt)
        for key in ("chosen", "rejected"):
            answer = feature[f"{key}_ids"]
            out[f"{key}_input_ids"] = prompt + answer
            out[f"{key}_attention_mask"] = [1] * (len(prompt) + len(answer))
            out[f"{key}_labels"] = [-100] * len(prompt) + answer
        return out


def method_arguments(recipe, args: dict, log=print) -> dict:
    """TRL config arguments the method needs beyond the recipe's keys."""
    method = recipe.method
    if args.pop("padding_free", None):
        log("note: padding_free: TRL 1.16's preference trainers pad (DPO's padding-free path is disabled); ignored")
    args.pop("max_prompt_length", None)
    if method == "simpo":
        args.setdefault("loss_type", "simpo")
        if "cpo_alpha" not in recipe.sft:
            args["cpo_alpha"] = 0.0  # SimPO proper; cpo_alpha > 0 adds CPO's likelihood term on the chosen answers
    if method in REFERENCE_FREE:
        args["include_num_input_tokens_seen"] = "no"  # their batches hold chosen_input_ids, not input_ids
        args["remove_unused_columns"] = False
    return args


def build_preference_trainer(recipe, model, tokenizer, precision, out: Path, data, lora, callbacks: list, log=print):
    """-> TRL's trainer for the recipe's method; `lora` is the LoRA config for DPO/KTO to apply (else None)."""
    from ftkit.train.args import sft_config

    config_class, trainer_class = trainer_classes(recipe.method)
    config = sft_config(recipe, precision, out, data.eval is not None, config_class,
                        lambda args: method_arguments(recipe, args, log))
    kwargs = dict(model=model, args=config, train_dataset=data.train, eval_dataset=data.eval,
                  processing_class=tokenizer, callbacks=callbacks)
    if recipe.method in ("dpo", "kto"):
        kwargs["peft_config"] = lora
        if lora is None and not config.precompute_ref_log_probs:
            kwargs["ref_model"] = frozen_copy(model)  # the starting weights, whatever they were loaded from
    try:
        return trainer_class(**kwargs)
    except (ValueError, NotImplementedError) as err:  # TRL's refusals of a combination of options
        raise FtkitError(f"{recipe.method}: {str(err).splitlines()[0]}") from None


def frozen_copy(model):
    reference = copy.deepcopy(model)
    reference.requires_grad_(False)
    return reference.eval()


def preference_figures(log_history: list[dict]) -> dict:
    """Rewards of chosen and rejected answers, their margin and the share of pairs ranked right, per logged step."""
    rows = [e for e in log_history if "loss" in e and any(k in e for k in FIGURES)]
    if not rows:
        return {}
    per_step = [{"step": e["step"], **{name: e[key] for key, name in FIGURES.items() if key in e}} for e in rows]
    final = {f"final_{name}": per_step[-1].get(name) for name in FIGURES.values() if name in per_step[-1]}
    return {**final, "preference_per_step": per_step}


def preference_series(log_history: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """Rewards, margin and accuracy per logged step, by figure name; empty when the run logged none."""
    per_step = preference_figures(log_history).get("preference_per_step") or []
    series = {}
    for name in ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy"):
        points = [(e["step"], e[name]) for e in per_step if name in e and math.isfinite(e[name])]
        if points:
            series[name.replace("_", " ")] = points
    return series
