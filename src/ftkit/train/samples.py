"""Before/after answers for a few eval prompts, in every run (`eval_samples`).

Seeds 001 and 003 compare the model's answers before and after fine-tuning by hand; ftkit does it for
every run: greedy answers from the untouched model (generated before the first step, so it works for
full fine-tuning too) and from the trained one, written to samples.md and scored in train_summary.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ftkit.inference.generate import generate
from ftkit.inference.metrics import exact_and_chrf
from ftkit.inference.options import GenerationOptions
from ftkit.rundir import write_atomic, write_json_atomic


@dataclass
class Sample:
    prompt: list[dict]
    reference: str  # the answer trained on: SFT's, or a preference pair's chosen one
    before: str = ""
    after: str = ""
    rejected: str | None = None  # a preference pair's rejected answer


def pick_samples(conversations: list, count: int) -> list[Sample]:
    """The first `count` eval conversations, cut before their last assistant turn; or preference rows (a prompt with
    chosen and rejected answers, or KTO's desirable completions)."""
    samples = []
    for item in conversations:
        if len(samples) == count:
            break
        if isinstance(item, dict):  # data/preference.py's rows
            if item.get("label") is False:
                continue
            answer = item.get("chosen") or item["completion"]
            rejected = item["rejected"]["content"] if "rejected" in item else None
            samples.append(Sample(prompt=item["prompt"], reference=answer["content"], rejected=rejected))
            continue
        last = max(i for i, m in enumerate(item) if m["role"] == "assistant")
        samples.append(Sample(prompt=item[:last], reference=item[last]["content"]))
    return samples


def answer_all(model, chat_format, samples: list[Sample], field: str, max_new_tokens: int) -> None:
    options = GenerationOptions(max_new_tokens=max_new_tokens, greedy=True)
    was_training = model.training
    model.eval()
    for sample in samples:
        setattr(sample, field, generate(model, chat_format, sample.prompt, options).strip())
    model.train(was_training)


def write_markdown(samples: list[Sample], path: Path) -> None:
    lines = ["# Eval samples: before and after training", ""]
    for i, s in enumerate(samples, 1):
        question = s.prompt[-1]["content"] if s.prompt else ""
        reference = ([f"**chosen**: {s.reference}", "", f"**rejected**: {s.rejected}"] if s.rejected is not None
                     else [f"**reference**: {s.reference}"])
        lines += [f"## {i}. {question}", "", *reference, "", f"**before**: {s.before}", "", f"**after**: {s.after}", ""]
    write_atomic(path, "\n".join(lines))


def table(samples: list[Sample], width: int = 40) -> str:
    def cut(text: str) -> str:
        text = " ".join(text.split())
        return text if len(text) <= width else text[: width - 1] + "…"

    rows = [f"{'reference':<{width}} | {'before':<{width}} | after"]
    rows += [f"{cut(s.reference):<{width}} | {cut(s.before):<{width}} | {cut(s.after)}" for s in samples]
    return "\n".join(rows)


def scores(samples: list[Sample], field: str) -> dict[str, float]:
    return exact_and_chrf([getattr(s, field) for s in samples], [s.reference for s in samples])


def before_training(trainer, recipe, chat_format, conversations: list, state, log=print) -> list:
    """Answer a few eval prompts with the untouched model; [] when eval_samples is 0 or not possible."""
    count = recipe.run.eval_samples if recipe.run.eval_samples is not None else (5 if conversations else 0)
    if count <= 0 or not conversations:
        return []
    if state.num_processes > 1:
        log("note: eval_samples skipped: before/after generation runs only in single-process training")
        return []
    picked = pick_samples(conversations, count)
    answer_all(trainer.model, chat_format, picked, "before", recipe.run.eval_samples_max_new_tokens)
    return picked


def after_training(trainer, recipe, chat_format, picked: list, summary: dict, log=print) -> dict:
    answer_all(trainer.model, chat_format, picked, "after", recipe.run.eval_samples_max_new_tokens)
    out = Path(trainer.args.output_dir)
    write_markdown(picked, out / "samples.md")
    summary["eval_samples"] = {"count": len(picked), "before": scores(picked, "before"),
                               "after": scores(picked, "after")}
    write_json_atomic(out / "train_summary.json", summary)
    log(f"eval samples (greedy; full text in {out / 'samples.md'}):")
    log(table(picked))
    before, after = summary["eval_samples"]["before"], summary["eval_samples"]["after"]
    log(f"exact match {before['exact_match']:.0%} -> {after['exact_match']:.0%}, chrF {before['chrf']:.1f} -> {after['chrf']:.1f}")
    return summary
