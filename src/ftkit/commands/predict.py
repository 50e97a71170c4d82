"""Predict stage: answer every row of a file in any training format, batched, into JSON lines, and score
the answers against the rows' own answers when they have them.

The prompt of a row is its conversation up to the last assistant turn, built with the run's saved chat
template exactly as `ftkit chat` builds it; the reference is that turn's content. Rows without an answer
(an Alpaca test file of instruction/input, a prompt-only file, messages ending with a user turn) are
answered and have no reference. Rerunning with the same --output skips the rows already written.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from ftkit.inference.options import GenerationOptions
from ftkit.data.formats import (BadRow, detect_format, from_alpaca, from_messages, from_prompt_completion,
                                from_sharegpt)
from ftkit.errors import FtkitError
from ftkit.inference.metrics import score

READERS = {"messages": from_messages, "sharegpt": from_sharegpt, "alpaca": from_alpaca,
           "prompt_completion": from_prompt_completion}


@dataclass
class Example:
    row: int  # 1-based row number in the input file
    prompt: list[dict]
    reference: str | None


def input_format(columns: list[str]) -> str:
    """The training formats, plus their answerless variants (instruction without output, prompt alone)."""
    try:
        fmt = detect_format(columns)
    except BadRow as err:
        if "instruction" in columns:
            return "alpaca"
        if "prompt" in columns:
            return "prompt_completion"
        raise FtkitError(str(err).split("; Map your columns")[0]) from None
    if fmt == "text":
        raise FtkitError("plain 'text' rows have no prompt to answer; predict needs messages, conversations, "
                         "instruction[/input/output] or prompt[/completion] rows")
    return fmt


def to_example(row: dict, fmt: str, number: int, system: str | None) -> Example:
    if fmt == "prompt_completion" and row.get("completion") is None:
        row = {**row, "completion": [] if isinstance(row.get("prompt"), list) else ""}
    try:
        messages = READERS[fmt](row)
    except BadRow as err:
        raise FtkitError(f"row {number}: {err}") from None
    if system and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}, *messages]
    reference = None
    if messages and messages[-1]["role"] == "assistant":
        last = messages.pop()
        reference = last["content"] if isinstance(last["content"], str) and last["content"].strip() else None
    if not messages or messages[-1]["role"] != "user" or not str(messages[-1]["content"]).strip():
        raise FtkitError(f"row {number}: the conversation does not end with a user turn to answer")
    for m in messages:
        if m["role"] not in ("system", "user", "assistant") or not isinstance(m["content"], str):
            raise FtkitError(f"row {number}: each turn needs a role (system, user, assistant) and text content")
    return Example(number, messages, reference)


def read_examples(path: Path, system: str | None) -> list[Example]:
    from ftkit.data.loading import BUILDERS, load_local

    if not path.is_file():
        raise FtkitError(f"{path}: no such file")
    if path.suffix.lower() not in BUILDERS:
        raise FtkitError(f"{path}: expected one of {', '.join(BUILDERS)}")
    import datasets

    datasets.disable_progress_bars()
    rows = load_local([path]).to_list()
    if not rows:
        raise FtkitError(f"{path}: no rows")
    fmt = input_format(list(rows[0]))
    return [to_example(row, fmt, number, system) for number, row in enumerate(rows, 1)]


def done_rows(output: Path) -> dict[int, dict]:
    """Rows already answered in a previous run; a torn last line (an interrupted write) is dropped."""
    if not output.is_file():
        return {}
    done, lines = {}, output.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            done[int(record["row"])] = record
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            if number == len(lines):
                break
            raise FtkitError(f"{output}:{number}: not a prediction line; choose another --output") from None
    output.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in done.values()), encoding="utf-8")
    return done


def run_predict(adapter: Path | None, model_dir: Path | None, base: str | None, input_path: Path, output: Path,
                options: GenerationOptions, batch_size: int = 8, system: str | None = None,
                dtype: str | None = None, worst: int = 3, trust_remote_code: bool = False, log=print) -> dict:
    from ftkit.inference.generate import generate_batch
    from ftkit.inference.loading import default_system, load_for_chat, quiet_loading

    options.check()
    if batch_size < 1:
        raise FtkitError("--batch-size must be at least 1")
    examples = read_examples(Path(input_path), default_system(adapter or model_dir, system))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    done = done_rows(output)
    pending = [e for e in examples if e.row not in done]
    if done:
        log(f"{output}: {len(done)} of {len(examples)} rows already done; answering the other {len(pending)}")
    if pending:
        quiet_loading()
        model, _, chat_format = load_for_chat(adapter, model_dir, base, dtype, trust_remote_code)
        from tqdm.auto import tqdm

        with output.open("a", encoding="utf-8") as sink, tqdm(total=len(pending), desc="predict", unit="row",
                                                              file=sys.stderr, disable=None) as bar:
            for start in range(0, len(pending), batch_size):
                batch = pending[start:start + batch_size]
                outputs = generate_batch(model, chat_format, [e.prompt for e in batch], options)
                for example, text in zip(batch, outputs):
                    record = {"row": example.row, "prompt": example.prompt, "output": text,
                              "reference": example.reference}
                    sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                    done[example.row] = record
                sink.flush()
                bar.update(len(batch))
    log(f"wrote {output} ({len(done)} rows)")
    records = [done[e.row] for e in examples if e.row in done]
    metrics = score([r for r in records if r.get("reference") is not None])
    if metrics:
        log(format_metrics(metrics, worst))
    return metrics


def format_metrics(metrics: dict, worst: int = 3) -> str:
    lines = [f"{metrics['rows']} rows with references: exact match {metrics['exact_match']:.3f}, "
             f"chrF {metrics['chrf']:.1f}, BLEU {metrics['bleu']:.1f}, ROUGE-L F1 {metrics['rouge_l']:.3f}"]
    for p in metrics["worst"][:worst]:
        lines += [f"worst: row {p['row']} (chrF {p['chrf']:.1f})", f"  reference: {clip(p['reference'])}",
                  f"  output:    {clip(p['output'])}"]
    return "\n".join(lines)


def clip(text: str, width: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
