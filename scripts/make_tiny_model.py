"""Build a tiny random-init Llama-architecture causal LM and a byte-level BPE tokenizer, offline.

    python scripts/make_tiny_model.py models/tiny

Deterministic (same bytes every run), a few seconds on a laptop CPU. The tokenizer is trained on the
built-in English + Chinese corpus below, has ChatML special tokens and a ChatML chat template, a
distinct pad token, and eos `<|endoftext|>` that differs from the end-of-turn token `<|im_end|>` (as in
Qwen-style models), so tests exercise the end-of-turn handling real models need.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = """
The quick brown fox jumps over the lazy dog. A model learns from data, one token at a time.
What is the capital of France? The capital of France is Paris. How are you today? I am fine, thank you.
Fine-tuning adapts a pretrained language model to a task with a small dataset and a few steps.
Please answer the question in one short sentence. You are a helpful assistant. Hello! How can I help you?
The river flows to the sea, and the mountains stand in the morning light. Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100.
Learning rate, batch size, gradient accumulation, epochs, loss, evaluation, checkpoint, adapter, tokenizer.
Write a short poem about the moon. Translate this sentence into Chinese. Summarise the text below.
你好！今天天氣很好。我們一起去公園散步吧。請用一句話回答這個問題。你是一個樂於助人的助手。
床前明月光，疑是地上霜。舉頭望明月，低頭思故鄉。白日依山盡，黃河入海流。欲窮千里目，更上一層樓。
春眠不覺曉，處處聞啼鳥。夜來風雨聲，花落知多少。相見時難別亦難，東風無力百花殘。
香港係一個國際城市，有好多高樓大廈同埋美食。你食咗飯未呀？我哋一齊去飲茶啦。唔該晒！
机器学习是人工智能的一个分支。大语言模型通过大量文本进行预训练，然后用指令数据进行微调。
北京是中国的首都。上海是一个大城市。长江是中国最长的河流。请写一首关于秋天的诗。
模型、数据、训练、评估、损失、学习率、批次、梯度、检查点、适配器、分词器、对话、助手、用户、系统。
"""


def train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line.strip() for line in CORPUS.strip().splitlines()]
    tokenizer.train_from_iterator(lines * 4, trainer=trainer)
    return tokenizer


def build(out_dir: Path, vocab_size: int = 1024, hidden: int = 64, layers: int = 2, seed: int = 0) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(vocab_size),
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHATML_TEMPLATE,
        model_max_length=1024,
    )
    tokenizer.save_pretrained(out_dir)

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|pad|>"],
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], pad_token_id=ids["<|pad|>"], bos_token_id=None
    )
    model.save_pretrained(out_dir)
    (out_dir / "README.md").write_text(
        "# tiny-llama (ftkit test model)\n\nRandom-init Llama, built by scripts/make_tiny_model.py. Knows nothing.\n",
        encoding="utf-8",
    )
    summary = {"vocab_size": len(tokenizer), "parameters": sum(p.numel() for p in model.parameters()), **ids}
    print(json.dumps(summary))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    build(args.out_dir, args.vocab_size, args.hidden, args.layers, args.seed)
