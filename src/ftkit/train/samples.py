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
    reference: str  # the answer trained on: SFT's (a tool call or reasoning as the template renders it), or the chosen one
    tools: list | None = None
    kwargs: dict | None = None  # the row's chat_template_kwargs
    before: str = ""
    after: str = ""
    rejected: str | None = None  # a preference pair's rejected answer


def pick_samples(chat_format, conversations: list[dict], count: int) -> list[Sample]:
    """The first `count` eval rows: a conversation cut before its last assistant turn, whose reference is what the
    model is trained to write there (with a tool call or reasoning, the template's rendering of it); or a
    preference row (a prompt with chosen and rejected answers, or KTO's desirable completions)."""
    samples = []
    for row in conversations:
        if len(samples) == count:
            break
        if "messages" not in row:  # data/preference.py's rows
            if row.get("label") is False:
                continue
            answer = row.get("chosen") or row["completion"]
            rejected = row["rejected"]["content"] if "rejected" in row else None
            samples.append(Sample(prompt=row["prompt"], reference=answer["content"], rejected=rejected))
            continue
        messages, tools, kwargs = row["messages"], row.get("tools"), row.get("chat_template_kwargs")
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        reference = chat_format.answer(messages[: last + 1], tools, kwargs).strip()
        samples.append(Sample(prompt=messages[:last], reference=reference, tools=tools, kwargs=kwargs))
    return samples


def answer_all(model, chat_format, samples: list[Sample], field: str, max_new_tokens: int) -> None:
    options = GenerationOptions(max_new_tokens=max_new_tokens, greedy=True)
    was_training = model.training
    model.eval()
    for sample in samples:
        text = generate(model, chat_format, sample.prompt, options, tools=sample.tools, kwargs=sample.kwargs)
        setattr(sample, field, text.strip())
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
    """reference | before | after, one line per sample, columns measured in terminal cells (CJK takes two)."""
    from ftkit.cells import columns

    rows = [["reference", "before", "after"]] + [[s.reference, s.before, s.after] for s in samples]
    return "\n".join(columns(rows, [width, width, width]))


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
    picked = pick_samples(chat_format, conversations, count)
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
