"""Before/after answers for a few eval prompts, in every run (`eval_samples`).

Seeds 001 and 003 compare the model's answers before and after fine-tuning by hand; ftkit does it for
every run: greedy answers from the untouched model (generated before the first step, so it works for
full fine-tuning too) and from the trained one, written to samples.md and scored in train_summary.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Sample:
    prompt: list[dict]
    reference: str
    before: str = ""
    after: str = ""


def pick_samples(conversations: list[list[dict]], count: int) -> list[Sample]:
    """The first `count` eval conversations, cut before their last assistant turn."""
    samples = []
    for messages in conversations[:count]:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        samples.append(Sample(prompt=messages[:last], reference=messages[last]["content"]))
    return samples


def answer_all(model, chat_format, samples: list[Sample], field: str, max_new_tokens: int) -> None:
    from ftkit.chat import GenerationOptions, generate

    options = GenerationOptions(max_new_tokens=max_new_tokens, greedy=True)
    was_training = model.training
    model.eval()
    for sample in samples:
        setattr(sample, field, generate(model, chat_format, sample.prompt, options).strip())
    model.train(was_training)


def scores(samples: list[Sample], field: str) -> dict[str, float]:
    from sacrebleu.metrics import CHRF

    chrf = CHRF()
    outputs = [getattr(s, field) for s in samples]
    return {
        "exact_match": sum(o == s.reference.strip() for o, s in zip(outputs, samples)) / len(samples),
        "chrf": chrf.corpus_score(outputs, [[s.reference for s in samples]]).score,
    }


def write_markdown(samples: list[Sample], path: Path) -> None:
    lines = ["# Eval samples: before and after training", ""]
    for i, s in enumerate(samples, 1):
        question = s.prompt[-1]["content"] if s.prompt else ""
        lines += [f"## {i}. {question}", "", f"**reference**: {s.reference}", "", f"**before**: {s.before}", "",
                  f"**after**: {s.after}", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def table(samples: list[Sample], width: int = 40) -> str:
    def cut(text: str) -> str:
        text = " ".join(text.split())
        return text if len(text) <= width else text[: width - 1] + "…"

    rows = [f"{'reference':<{width}} | {'before':<{width}} | after"]
    rows += [f"{cut(s.reference):<{width}} | {cut(s.before):<{width}} | {cut(s.after)}" for s in samples]
    return "\n".join(rows)
