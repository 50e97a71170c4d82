"""Predict stage: answer every row of a file in any training format, batched, into JSON lines, and score
the answers against the rows' own answers when they have them.

The prompt of a row is its conversation up to the last assistant turn, built with the run's saved chat
template exactly as `ftkit chat` builds it (with the row's `tools` and `chat_template_kwargs`); the reference is
what training taught for that turn (its content, or with a tool call or reasoning the template's rendering of it);
tool calls in the answer are also written as `tool_calls`. Rows without an answer (an Alpaca test file of
instruction/input, a prompt-only file, messages ending with a user turn or a tool result) are answered and have no
reference. Rerunning with the same --output skips the rows already written.

The scores (and the run's settings) also go to OUTPUT_STEM.metrics.json beside the predictions, replaced on
every run (it carries its own mark; any other file of that name is refused before anything loads).

Every line ftkit predict writes begins `{"ftkit_predict": 1, "row": N, ...}`: that mark is how a rerun knows the
file is its own to resume. Any other existing file (the input itself, a user's notes, another tool's output)
is refused and left untouched. Lines are appended and synced to disk after every batch, so a kill leaves at
worst a torn last line, which the next run drops and answers again.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ftkit.data.formats import BadRow, conversation_parts, detect_format
from ftkit.data.messages import first_problem
from ftkit.errors import FtkitError
from ftkit.files import check_arg_text
from ftkit.inference.metrics import score
from ftkit.inference.options import GenerationOptions

MARK = "ftkit_predict"
MARK_PREFIX = '{"ftkit_predict": 1'  # how json.dumps writes the first key of every record
METRICS_MARK = "ftkit_predict_metrics"  # the first key of the metrics file: only such a file is replaced


@dataclass
class Example:
    row: int  # 1-based row number in the input file
    prompt: list[dict]
    answer: dict | None  # the row's own last assistant turn, if it has one: the reference
    tools: list | None = None
    kwargs: dict | None = None  # the row's chat_template_kwargs


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
    """A row read as training reads it (tool calls, tool results, tools and chat_template_kwargs included), its last
    assistant turn taken off as the reference; what is left must end with a user turn or a tool result."""
    if fmt == "prompt_completion" and row.get("completion") is None:
        row = {**row, "completion": [] if isinstance(row.get("prompt"), list) else ""}
    try:
        messages, tools, kwargs = conversation_parts(row, fmt, system)
    except BadRow as err:
        raise FtkitError(f"row {number}: {err}") from None
    answer = None
    if messages and messages[-1]["role"] == "assistant":
        last = messages.pop()
        answer = last if last["content"].strip() or last.get("tool_calls") else None
    if not messages or messages[-1]["role"] not in ("user", "tool") or not messages[-1]["content"].strip():
        raise FtkitError(f"row {number}: the conversation does not end with a user turn (or a tool result) to answer")
    problem = first_problem(messages + [{"role": "assistant", "content": "answer"}])
    if problem:
        raise FtkitError(f"row {number}: {problem}")
    return Example(number, messages, answer, tools, kwargs)


def reference(chat_format, example: Example) -> str | None:
    """What the model was trained to write for the row's own answer: with a tool call or reasoning, the template's
    rendering of it (so an exact match means the same call), else its text."""
    if example.answer is None:
        return None
    try:
        return chat_format.answer(example.prompt + [example.answer], example.tools, example.kwargs).strip()
    except FtkitError:
        return example.answer["content"]


def check_input(path: Path) -> None:
    from ftkit.config.sources import BUILDERS

    if path.is_dir():
        raise FtkitError(f"{path}: is a directory; --input takes one data file ({', '.join(BUILDERS)})")
    if not path.is_file():
        raise FtkitError(f"{path}: no such file")
    if path.suffix.lower() not in BUILDERS:
        raise FtkitError(f"{path}: expected one of {', '.join(BUILDERS)}")


def check_output(output: Path, input_path: Path) -> None:
    """--output is a file name, not the input (under any spelling or link), in a folder that can be written."""
    if output.is_dir():
        raise FtkitError(f"--output '{output}' is a directory; give a file name, e.g. {output / 'predictions.jsonl'}")
    if output.exists() and os.path.samefile(output, input_path):
        raise FtkitError(f"--output '{output}' is the --input file; choose another --output (predictions never "
                         "replace their input)")
    folder = output.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise FtkitError(f"--output '{output}' cannot be written ({folder} is not a writable folder); choose "
                         "another --output")


def read_examples(path: Path, system: str | None) -> list[Example]:
    from ftkit.data.loading import read_rows

    rows = read_rows([path])
    fmt = input_format(list(dict.fromkeys(key for row in rows for key in row)))
    try:
        return [to_example(row, fmt, number, system) for number, row in enumerate(rows, 1)]
    except FtkitError as err:  # "row N: ..." names the file it is in, as read_rows' errors do
        raise FtkitError(f"{path}: {err}") from None


def done_rows(output: Path) -> dict[int, dict]:
    """Rows a previous `ftkit predict` wrote to this file. A file it did not write is refused, untouched; a torn
    last line (a run killed mid-write) is cut off so the row is answered again."""
    if not output.is_file() or output.stat().st_size == 0:
        return {}
    data = output.read_bytes()
    *complete, torn = data.split(b"\n")
    done = {}
    for line in complete:
        record = prediction(line)
        if record is None:
            raise not_ours(output)
        done[record["row"]] = record
    if torn:  # our own line cut short by a kill; a bare prefix of the mark only after lines of ours
        text = torn.decode("utf-8", errors="replace")
        if not (text.startswith(MARK_PREFIX) or (done and MARK_PREFIX.startswith(text))):
            raise not_ours(output)
        os.truncate(output, len(data) - len(torn))
    return done


def not_ours(output: Path) -> FtkitError:
    return FtkitError(f"--output '{output}' exists and was not written by ftkit predict; choose another --output "
                      "(a rerun resumes only ftkit predict's own output)")


def prediction(line: bytes) -> dict | None:
    """A line ftkit predict wrote, or None."""
    try:
        record = json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None
    ok = isinstance(record, dict) and record.get(MARK) == 1 and isinstance(record.get("row"), int)
    return record if ok else None


def run_predict(adapter: Path | None, model_dir: Path | None, base: str | None, input_path: Path, output: Path,
                options: GenerationOptions, batch_size: int = 8, system: str | None = None,
                dtype: str | None = None, worst: int = 3, trust_remote_code: bool = False, log=print,
                template_kwargs: str | None = None) -> dict:
    from ftkit.inference.loading import default_system, parse_template_kwargs

    options.check()
    kwargs = parse_template_kwargs(template_kwargs)
    if batch_size < 1:
        raise FtkitError("--batch-size must be at least 1")
    if (adapter is None) == (model_dir is None):
        raise FtkitError("give exactly one of --adapter RUN_DIR or --model MODEL_DIR")
    source, input_path, output = Path(adapter or model_dir), Path(input_path), Path(output)
    if not source.is_dir():
        raise FtkitError(f"{source}: no such directory")
    check_arg_text(system, "--system")
    check_input(input_path)
    check_output(output, input_path)
    check_metrics_file(metrics_path(output), input_path)
    done = done_rows(output)
    examples = read_examples(input_path, default_system(source, system))
    pending = [e for e in examples if e.row not in done]
    if done:
        log(f"{output}: {len(done)} of {len(examples)} rows already done; answering the other {len(pending)}")
    if pending:
        answer_rows(adapter, model_dir, base, dtype, trust_remote_code, pending, output, options, batch_size, done,
                    kwargs)
    log(f"wrote {output} ({len(done)} rows)")
    records = [done[e.row] for e in examples if e.row in done]
    metrics = score([r for r in records if r.get("reference") is not None])
    write_metrics(metrics_path(output), metrics, input_path, output, source, len(examples), options)
    log(f"metrics: {metrics_path(output)}" + ("" if metrics else " (no row has a reference answer to score)"))
    if metrics:
        log(format_metrics(metrics, worst))
    return metrics


def metrics_path(output: Path) -> Path:
    """preds.jsonl -> preds.metrics.json, beside it."""
    return output.with_name(f"{output.stem}.metrics.json")


def check_metrics_file(path: Path, input_path: Path) -> None:
    """The metrics file may be replaced only when an earlier ftkit predict wrote it."""
    if not path.exists() and not path.is_symlink():
        return
    if path.exists() and not path.is_dir() and os.path.samefile(path, input_path):
        raise FtkitError(f"{path}: the metrics file's name is the --input file; choose another --output")
    try:
        ours = json.loads(path.read_text(encoding="utf-8")).get(METRICS_MARK) == 1
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise FtkitError(f"{path} exists and was not written by ftkit predict (its metrics go there); move it, or "
                         "choose another --output")


def write_metrics(path: Path, metrics: dict, input_path: Path, output: Path, source: Path, rows: int,
                  options: GenerationOptions) -> None:
    from dataclasses import asdict

    from ftkit.rundir import write_json_atomic

    scores = {key: metrics.get(key) for key in ("exact_match", "chrf", "bleu", "rouge_l")}
    write_json_atomic(path, {METRICS_MARK: 1, "input": str(input_path), "predictions": str(output),
                             "model": str(source), "rows": rows, "scored_rows": metrics.get("rows", 0), **scores,
                             "worst": metrics.get("worst", []), "generation": asdict(options)})


def answer_rows(adapter, model_dir, base, dtype, trust_remote_code, pending: list[Example], output: Path,
                options: GenerationOptions, batch_size: int, done: dict, template_kwargs: dict | None = None) -> None:
    """Generate batch by batch, appending each batch's lines and syncing them to disk before the next."""
    from tqdm.auto import tqdm

    from ftkit.inference.generate import generate_batch
    from ftkit.inference.loading import load_for_chat, quiet_loading
    from ftkit.inference.replies import parse_reply

    quiet_loading()
    model, _, chat_format = load_for_chat(adapter, model_dir, base, dtype, trust_remote_code, template_kwargs)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("a", encoding="utf-8") as sink, tqdm(total=len(pending), desc="predict", unit="row",
                                                          file=sys.stderr, disable=None) as bar:
        for start in range(0, len(pending), batch_size):
            batch = pending[start:start + batch_size]
            outputs = generate_batch(model, chat_format, [e.prompt for e in batch], options,
                                     [e.tools for e in batch], [e.kwargs for e in batch])
            for example, text in zip(batch, outputs):
                record = {MARK: 1, "row": example.row, "prompt": example.prompt, "output": text,
                          "reference": reference(chat_format, example)}
                calls = parse_reply(text, chat_format.tool_call_style).tool_calls if example.tools else []
                if calls:
                    record["tool_calls"] = calls
                sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                done[example.row] = record
            sink.flush()
            os.fsync(sink.fileno())
            bar.update(len(batch))


def format_metrics(metrics: dict, worst: int = 3) -> str:
    lines = [f"{metrics['rows']} rows with references: exact match {metrics['exact_match']:.3f}, "
             f"chrF {metrics['chrf']:.1f}, BLEU {metrics['bleu']:.1f}, ROUGE-L F1 {metrics['rouge_l']:.3f}"]
    for p in metrics["worst"][:worst]:
        lines += [f"worst: row {p['row']} (chrF {p['chrf']:.1f})", f"  reference: {clip(p['reference'])}",
                  f"  output:    {clip(p['output'])}"]
    return "\n".join(lines)


def clip(text: str, width: int = 120) -> str:
    """One line of at most `width` terminal cells (a CJK character takes two)."""
    from ftkit.cells import clip as clip_cells

    return clip_cells(text, width)
