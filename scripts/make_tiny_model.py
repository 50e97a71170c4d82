"""Build a tiny random-init Llama-architecture causal LM and a byte-level BPE tokenizer, offline.

    python scripts/make_tiny_model.py models/tiny
    python scripts/make_tiny_model.py models/tiny-qwen3 --family qwen3

Deterministic (same bytes every run), a few seconds on a laptop CPU. The tokenizer is trained on the
built-in English + Chinese corpus below. By default it has ChatML special tokens and a ChatML chat template, a
distinct pad token, and eos `<|endoftext|>` that differs from the end-of-turn token `<|im_end|>` (as in
Qwen-style models), so tests exercise the end-of-turn handling real models need. `--family qwen3|qwen2_5|llama3_1`
dresses it as that family's tokenizer instead: its special tokens, its plain added tokens (<think>, <tool_call>),
bos/eos/pad as the real one has them (Llama-3.1: no pad), and the family's real chat template as TRL ships it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
QWEN_PLAIN = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
# family -> special tokens, plain added tokens, bos, eos, pad, TRL template file (None: CHATML_TEMPLATE below)
FAMILIES = {
    "chatml": (SPECIAL_TOKENS, [], None, "<|endoftext|>", "<|pad|>", None),
    "qwen3": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], ["<think>", "</think>", *QWEN_PLAIN], None,
              "<|im_end|>", "<|endoftext|>", "qwen3.jinja"),
    "qwen2_5": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], QWEN_PLAIN, None, "<|im_end|>", "<|endoftext|>",
                "qwen2_5.jinja"),
    "llama3_1": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                  "<|eom_id|>", "<|python_tag|>"], [], "<|begin_of_text|>", "<|eot_id|>", None, "llama3_1.jinja"),
}
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

# Family tokenizers also learn the words of tool-calling templates and JSON schemas, as real tokenizers know
# English and JSON well; without them a tool prompt is a thousand byte-sized tokens and tests train slowly.
TOOL_CORPUS = """
# Tools You may call one or more functions to assist with the user query.
You are provided with function signatures within <tools></tools> XML tags:
For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
{"name": <function-name>, "arguments": <args-json-object>} You are Qwen, created by Alibaba Cloud. You are a helpful assistant.
Environment: ipython Cutting Knowledge Date: December 2023 Today Date: 26 Jul 2024
Given the following functions, please respond with a JSON for a function call with its proper arguments that best answers the given prompt.
Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.Do not use variables.
{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {
                    "type": "string"
                }
            },
            "required": [
                "city"
            ]
        }
    }
}
{
    "type": "function",
    "function": {
        "name": "get_moons",
        "description": "The moons of a planet",
        "parameters": {
            "type": "object",
            "properties": {
                "planet": {
                    "type": "string"
                }
            },
            "required": [
                "planet"
            ]
        }
    }
}
"""


def trl_template(name: str) -> str:
    """A chat template TRL ships (trl/chat_templates/NAME), found without importing trl."""
    import importlib.util

    spec = importlib.util.find_spec("trl")
    return (Path(spec.origin).parent / "chat_templates" / name).read_text(encoding="utf-8")


def train_tokenizer(vocab_size: int, special_tokens: list[str] = SPECIAL_TOKENS, extra: str = ""):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line.strip() for line in CORPUS.strip().splitlines()] + extra.strip("\n").splitlines()
    tokenizer.train_from_iterator(lines * 4, trainer=trainer)
    return tokenizer


def build(out_dir: Path, vocab_size: int = 1024, hidden: int = 64, layers: int = 2, seed: int = 0,
          family: str = "chatml") -> None:
    import torch
    from tokenizers import AddedToken
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials, plain, bos, eos, pad, template = FAMILIES[family]
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(vocab_size if family == "chatml" else 2 * vocab_size, specials,
                                         "" if family == "chatml" else TOOL_CORPUS),
        eos_token=eos,
        **{name: token for name, token in (("bos_token", bos), ("pad_token", pad)) if token},
        additional_special_tokens=[t for t in specials if t not in (bos, eos, pad)],
        chat_template=trl_template(template) if template else CHATML_TEMPLATE,
        model_max_length=2048 if template else 1024,
    )
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
    tokenizer.save_pretrained(out_dir)
    if family != "chatml":
        return build_model(out_dir, tokenizer, hidden, layers, seed)

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


def build_model(out_dir: Path, tokenizer, hidden: int, layers: int, seed: int) -> None:
    """A family-dressed model: stops at the family's eos (its end of turn), pads with its pad token if it has one."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                               bos_token_id=tokenizer.bos_token_id)
    model.save_pretrained(out_dir)
    print(json.dumps({"vocab_size": len(tokenizer), "parameters": sum(p.numel() for p in model.parameters())}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", choices=list(FAMILIES), default="chatml")
    args = parser.parse_args()
    build(args.out_dir, args.vocab_size, args.hidden, args.layers, args.seed, args.family)
