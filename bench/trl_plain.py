"""The baseline for bench/vs_trl.py: the TRL script a user writes by hand for the same run as ftkit's recipe
(tiny Llama, fp32, LoRA r8 all-linear + embed_tokens/lm_head in full, batch 4, lr 1e-2 constant, 200 steps,
one thread). Prints `BENCH <event> <step> <unix time>` at the first two step starts and at the end of training.

    python bench/trl_plain.py MODEL_DIR DATA.jsonl OUTPUT_DIR [STEPS]
"""

import sys
import time

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer


class Stamps(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step < 2:
            print(f"BENCH step_begin {state.global_step} {time.time():.6f} threads={torch.get_num_threads()}",
                  file=sys.stderr, flush=True)

    def on_train_end(self, args, state, control, **kwargs):
        print(f"BENCH train_end {state.global_step} {time.time():.6f}", file=sys.stderr, flush=True)


def main() -> None:
    model_dir, data, out = sys.argv[1:4]
    steps = int(sys.argv[4]) if len(sys.argv) > 4 else 200
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                             modules_to_save=["embed_tokens", "lm_head"], task_type="CAUSAL_LM")
    args = SFTConfig(output_dir=out, per_device_train_batch_size=4, max_steps=steps, learning_rate=1e-2,
                     lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, logging_steps=10,
                     save_strategy="no", report_to="none", seed=0, bf16=False, use_cpu=True,
                     gradient_checkpointing=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=load_dataset("json", data_files=data, split="train"),
                         processing_class=tokenizer, peft_config=peft_config, callbacks=[Stamps()])
    trainer.train()
    trainer.save_model(out)


if __name__ == "__main__":
    main()
