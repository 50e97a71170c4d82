"""Preview stage: what training will see, without loading weights.

Rows per source, token-length percentiles, what was truncated/dropped/skipped, how much carries loss,
and a few samples rendered token by token: trained tokens green, masked tokens grey, boundaries visible.
Preference data shows each pair's chosen and rejected answers side by side.
"""

from __future__ import annotations

import json

from ftkit.config.schema import Recipe


def percentiles(values: list[int]) -> dict[str, int]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]

    return {"min": ordered[0], "p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": ordered[-1]}


def sample_lengths(train) -> list[int]:
    """Tokens per sample: SFT's input_ids; a preference pair's prompt plus its longer answer."""
    if "input_ids" in train.column_names:
        return [len(ids) for ids in train["input_ids"]]
    answers = [key for key in ("chosen_ids", "rejected_ids", "completion_ids") if key in train.column_names]
    columns = [train["prompt_ids"], *(train[key] for key in answers)]
    return [len(row[0]) + max(len(a) for a in row[1:]) for row in zip(*columns)]


def statistics(prepared) -> dict:
    stats = prepared.stats
    lengths = sample_lengths(prepared.train)
    return {
        "rows_per_source_before_mixing": stats.rows_in_per_source,
        "rows_per_source_after_mixing": stats.rows_per_source,
        "train_samples": stats.train_rows,
        "eval_samples": stats.eval_rows,
        "test_split_carved": stats.test_split_carved,
        "token_length": percentiles(lengths),
        "truncated": stats.truncated,
        "dropped_overlong": stats.dropped_overlong,
        "dropped_no_loss": stats.dropped_no_loss,
        "skipped_bad_rows": stats.skipped_bad_rows,
        "tokens": stats.tokens,
        "trained_tokens": stats.trained_tokens,
        "trained_fraction": round(stats.trained_tokens / max(stats.tokens, 1), 4),
        "eval_tokens": stats.eval_tokens,
        "eval_trained_tokens": stats.eval_trained_tokens,
        "conversations": stats.conversations,
        "split_conversations": stats.split_conversations,
        "unrendered_turns": stats.unrendered_turns,
        "seed": stats.seed,
    }


def training_layout(stats: dict) -> str:
    """How the conversations become samples: whole, or one sample per assistant turn where the template rewrites
    earlier turns once later messages follow."""
    split, total, lost = stats["split_conversations"], stats["conversations"], stats["unrendered_turns"]
    line = (f"{total - split:,} training rows trained as one sample each; {split:,} as one sample per assistant "
            "turn, because the chat template renders earlier assistant turns differently once later messages follow "
            "(as Qwen3's drops their <think> block): each turn is trained as it is rendered when it is generated "
            "(a template that keeps earlier turns, such as TRL's qwen3_training.jinja, trains them as one sample)"
            ) if split else f"{total:,} training rows, each trained as one sample"
    if lost:
        line += (f"; note: in {lost:,} assistant turns the chat template leaves out text or reasoning the data has "
                 "(e.g. Llama-3.1's renders only the call of a turn with text beside a tool call): they are trained "
                 "as the template renders them")
    return line


def token_pieces(tokenizer, input_ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """(text, trained) per token; byte-level pieces of one character are joined so none shows as �."""
    pieces, buffer, trained = [], [], False
    for tok, label in zip(input_ids, labels):
        buffer.append(tok)
        trained = trained or label != -100
        text = tokenizer.decode(buffer)
        if text.endswith("\ufffd") and len(buffer) < 4:
            continue
        pieces.append((text, trained))
        buffer, trained = [], False
    if buffer:
        pieces.append((tokenizer.decode(buffer), trained))
    return pieces


def render_sample(tokenizer, input_ids: list[int], labels: list[int]):
    """A rich Text: alternating shades show token boundaries; green carries loss, grey does not."""
    from rich.text import Text

    text = Text()
    for i, (piece, trained) in enumerate(token_pieces(tokenizer, input_ids, labels)):
        style = ("bold green" if i % 2 else "bold bright_green") if trained else ("grey50" if i % 2 else "grey70")
        text.append(piece.replace("\n", "↵\n"), style=style + (" underline" if trained else ""))
    return text


def run_preview(recipe: Recipe, samples: int, as_json: bool, use_cache: bool = True) -> None:
    import sys

    from ftkit.config.sources import sources_from_recipe
    from ftkit.hub import prepare_hub_access

    def note(message: str) -> None:
        print(message, file=sys.stderr)

    # The probe first: datasets and huggingface_hub read HF_HUB_OFFLINE once, when they are imported.
    prepare_hub_access([recipe.model.model_name_or_path, recipe.model.tokenizer_name_or_path,
                        *(s.path for s in sources_from_recipe(recipe.data))], note)
    import datasets

    from ftkit.data.pipeline import build_datasets
    from ftkit.train.model import load_tokenizer

    if recipe.method != "sft":
        from ftkit.data.preference import build_preference_datasets as build_datasets

    datasets.disable_progress_bars()
    tokenizer, chat_format, _ = load_tokenizer(recipe.model, recipe.data.chat_template, note,
                                               recipe.data.chat_template_kwargs)
    prepared = build_datasets(recipe, chat_format, use_cache, note)
    stats = statistics(prepared)
    if as_json:
        print(json.dumps(stats, indent=2, ensure_ascii=False))
        return
    print_report(stats, prepared, tokenizer, chat_format, samples)


def print_report(stats: dict, prepared, tokenizer, chat_format, samples: int) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    table = Table(title="sources", show_edge=False)
    for column in ("source", "rows", "used"):
        table.add_column(column, justify="left" if column == "source" else "right")
    for source, rows in stats["rows_per_source_before_mixing"].items():
        table.add_row(escape(source), f"{rows:,}", f"{stats['rows_per_source_after_mixing'].get(source, 0):,}")
    console.print(table)
    lengths = ", ".join(f"{k} {v:,}" for k, v in stats["token_length"].items())
    console.print(f"train samples {stats['train_samples']:,}, eval samples {stats['eval_samples']:,}; "
                  f"token length: {lengths}")
    console.print(f"truncated {stats['truncated']}, dropped (too long) {stats['dropped_overlong']}, dropped (no loss) "
                  f"{stats['dropped_no_loss']}, skipped (bad rows) {stats['skipped_bad_rows']}")
    console.print(f"{stats['trained_tokens']:,} of {stats['tokens']:,} training tokens carry loss "
                  f"({100 * stats['trained_fraction']:.1f}%); end-of-turn token: {chat_format.end_of_turn!r}"
                  + (f"; eval split: {stats['eval_trained_tokens']:,} of {stats['eval_tokens']:,}"
                     if stats["eval_tokens"] else ""))
    console.print(escape(training_layout(stats)))
    for i in range(min(samples, len(prepared.train))):
        row = prepared.train[i]
        console.rule(f"sample {i + 1} ([bold green]green[/] carries loss, grey is masked)")
        if "input_ids" in row:
            console.print(render_sample(tokenizer, row["input_ids"], row["labels"]))
        else:
            console.print(preference_sample(tokenizer, row))


def preference_sample(tokenizer, row: dict):
    """A pair's chosen and rejected answers side by side after their shared prompt (KTO: the completion and its
    label), each token by token with its mask."""
    from rich.table import Table

    prompt = row["prompt_ids"]
    answers = [(key.removesuffix("_ids"), row[key]) for key in ("chosen_ids", "rejected_ids", "completion_ids")
               if key in row]
    table = Table(show_lines=True, expand=True)
    for name, _ in answers:
        label = "" if "label" not in row else (" (desirable)" if row["label"] else " (undesirable)")
        table.add_column(name + label, ratio=1, overflow="fold")
    table.add_row(*(render_sample(tokenizer, prompt + ids, [-100] * len(prompt) + ids) for _, ids in answers))
    return table
