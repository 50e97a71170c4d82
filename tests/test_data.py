"""Data stage: every format becomes one conversation form; bad data names file, line or row; the mixer
is seeded; the token cache is reused only when nothing that changes the tokens changed."""

from __future__ import annotations

import json

import pytest

from ftkit.data.formats import BadRow, detect_format, to_internal
from ftkit.data.loading import load_mixture
from ftkit.config.sources import SourceSpec
from ftkit.errors import FtkitError
from tests.helpers import ftkit, write_jsonl

QA = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


@pytest.mark.parametrize("row, expected", [
    ({"messages": QA}, QA),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, QA),
    ({"instruction": "q", "input": "", "output": "a"}, QA),
    ({"instruction": "以下是一首唐詩的第一句話", "input": "床前明月光，", "output": "疑是地上霜。"},
     [{"role": "user", "content": "以下是一首唐詩的第一句話\n床前明月光，"}, {"role": "assistant", "content": "疑是地上霜。"}]),
    ({"instruction": "q2", "output": "a2", "system": "s", "history": [["q", "a"]]},
     [{"role": "system", "content": "s"}, *QA, {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]),
    ({"prompt": "q", "completion": "a"}, QA),
    ({"prompt": [QA[0]], "completion": [QA[1]]}, QA),
])
def test_formats_normalise_to_messages(row, expected):
    assert to_internal(row, detect_format(list(row)), None)["messages"] == expected


def test_recipe_system_prompt_added_only_where_missing():
    assert to_internal({"messages": QA}, "messages", "sys")["messages"][0] == {"role": "system", "content": "sys"}
    own = [{"role": "system", "content": "mine"}, *QA]
    assert to_internal({"messages": own}, "messages", "sys")["messages"] == own


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user", "content": "q"}], "no assistant turn: nothing to learn from"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}], "turn 2: empty assistant turn"),
    ([*QA, {"role": "system", "content": "s"}], "turn 3: a system turn may only come first"),
    ([QA[0], QA[0], QA[1]], "turn 2: two user turns in a row"),
    ([{"role": "robot", "content": "x"}, QA[1]], "turn 1: unknown role 'robot' (expected system, user, assistant, tool)"),
])
def test_bad_conversations_say_why(messages, message):
    with pytest.raises(BadRow, match="^" + message.replace("(", r"\(").replace(")", r"\)") + "$"):
        to_internal({"messages": messages}, "messages", None)


def test_unknown_columns_list_what_was_found_and_tried():
    with pytest.raises(BadRow) as err:
        detect_format(["question", "answer"])
    assert "columns ['answer', 'question']" in str(err.value)
    assert "tried messages, conversations (ShareGPT), instruction/output (Alpaca), prompt/completion, text" in str(err.value)


def test_bad_row_error_names_source_and_row_or_is_skipped_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": QA}, {"messages": [QA[0]]}, {"messages": QA}])
    with pytest.raises(FtkitError) as err:
        load_mixture([SourceSpec(str(path))], None, "error", 0, None)
    assert err.value.lines == [f"source '{path}', row 2: no assistant turn: nothing to learn from "
                               "(set on_bad_rows: skip to skip such rows)"]
    train, _, stats = load_mixture([SourceSpec(str(path))], None, "skip", 0, None)
    assert len(train) == 2 and stats.skipped == 1


def test_mixer_weights_are_fractions_or_counts_and_seeded(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"messages": [QA[0], {"role": "assistant", "content": f"a{i}"}]} for i in range(20)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(30)])
    specs = [SourceSpec(str(a), weight=0.5), SourceSpec(str(b), weight=7)]
    train, evaluation, stats = load_mixture(specs, None, "error", 123, None)
    assert len(train) == 10 + 7 and evaluation == []
    assert stats.rows_used == {f"{a}[train]": 10, f"{b}[train]": 7}
    assert load_mixture(specs, None, "error", 123, None)[0] == train
    assert load_mixture(specs, None, "error", 124, None)[0] != train


def test_test_split_carved_with_seed(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(20)])
    train, evaluation, stats = load_mixture([SourceSpec(str(path), splits=["train", "test"])], None, "error", 1, 0.25)
    assert (len(train), len(evaluation), stats.test_split_carved) == (15, 5, 5)
    assert not {json.dumps(r) for r in train} & {json.dumps(r) for r in evaluation}


def recipe_for(tmp_path, tiny_model, data_path, extra: str = ""):
    path = tmp_path / "r.yml"
    path.write_text(f"model_name_or_path: {tiny_model}\ndataset_mixer:\n  {data_path}: 1.0\n"
                    f"output_dir: {tmp_path / 'out'}\nmax_steps: 1\n{extra}", encoding="utf-8")
    return path


def test_malformed_jsonl_line_is_named_with_exit_2(tmp_path, tiny_model):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"messages": QA}) + "\n" + '{"messages": [oops]}\n', encoding="utf-8")
    result = ftkit("train", str(recipe_for(tmp_path, tiny_model, data)))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"ftkit: error: {data}:2: not valid JSON: Expecting value (column 15)")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_token_cache_reused_and_invalidated_by_in_place_edit(tmp_path, tiny_model):
    from ftkit.data.pipeline import build_datasets
    from ftkit.train.model import load_tokenizer
    from ftkit.config.recipe import load_recipe

    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": [QA[0], {"role": "assistant", "content": "aaaa"}]}])
    recipe = load_recipe(recipe_for(tmp_path, tiny_model, data))
    _, chat_format, _ = load_tokenizer(recipe.model, None, log=lambda *_: None)
    logs: list[str] = []
    first, _, _, _ = build_datasets(recipe, chat_format, log=logs.append)
    again, _, _, _ = build_datasets(recipe, chat_format, log=logs.append)
    assert logs[0].startswith("tokenised 1 conversations") and logs[1].startswith("reused cached tokens")
    assert again["input_ids"] == first["input_ids"]
    import os

    stat = data.stat()
    write_jsonl(data, [{"messages": [QA[0], {"role": "assistant", "content": "bbbb"}]}])  # same size, new content
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same mtime: only the content differs
    assert data.stat().st_size == stat.st_size and data.stat().st_mtime_ns == stat.st_mtime_ns
    edited, _, _, _ = build_datasets(recipe, chat_format, log=logs.append)
    assert logs[2].startswith("tokenised 1 conversations")
    assert edited["input_ids"] != first["input_ids"]
    uncached, _, _, _ = build_datasets(recipe, chat_format, use_cache=False, log=logs.append)
    assert logs[3].startswith("tokenised") and uncached["input_ids"] == edited["input_ids"]


@pytest.mark.parametrize("edit", ["system_prompt", "chat_template", "max_length", "train_on", "columns", "overlong",
                                  "weight", "revision", "tokenizer", "ftkit_version", "nothing"])
def test_cache_key_changes_with_everything_that_changes_tokens(tmp_path, tiny_model, monkeypatch, edit):
    from transformers import AutoTokenizer

    from ftkit.data import pipeline
    from ftkit.data.chat_format import ChatFormat
    from ftkit.config.templates import BUILTIN_TEMPLATES
    from ftkit.config.recipe import load_recipe

    data = write_jsonl(tmp_path / "d.jsonl", [{"q": "x", "a": "y"}])
    raw = {"model_name_or_path": str(tiny_model),
           "dataset_mixture": [{"id": str(data), "columns": {"q": "prompt", "a": "completion"}}]}
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)

    def key(raw_recipe, tok=tokenizer, template=BUILTIN_TEMPLATES["chatml"]):
        return pipeline.cache_key(load_recipe(None, raw=raw_recipe), ChatFormat(tok, template), 42)

    before = key(raw)
    changed = dict(raw)
    template = BUILTIN_TEMPLATES["chatml"]
    tok = tokenizer
    if edit == "system_prompt":
        changed["system_prompt"] = "Be brief."
    elif edit == "chat_template":
        template = template.replace("\\n", "\\n\\n", 1)
    elif edit == "max_length":
        changed["max_length"] = 77
    elif edit == "train_on":
        changed["train_on"] = "all"
    elif edit == "overlong":
        changed["overlong"] = "drop"
    elif edit == "columns":
        changed["dataset_mixture"] = [{"id": str(data), "columns": {"q": "prompt", "a": "completion", "b": "x"}}]
    elif edit == "revision":
        changed["dataset_mixture"] = [{"id": str(data), "columns": {"q": "prompt", "a": "completion"}, "revision": "v2"}]
    elif edit == "weight":
        changed["dataset_mixture"] = [{"id": str(data), "columns": {"q": "prompt", "a": "completion"}, "weight": 0.5}]
    elif edit == "tokenizer":
        tok = AutoTokenizer.from_pretrained(tiny_model)
        tok.add_tokens(["<new_token>"])
    elif edit == "ftkit_version":
        monkeypatch.setattr(pipeline, "__version__", "9.9.9")
    after = key(changed, tok, template)
    assert (after == before) == (edit == "nothing")


def test_per_source_system_prompt_wins_over_the_recipe_one(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"messages": QA}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"messages": QA}])
    train, _, _ = load_mixture([SourceSpec(str(a), system_prompt="from source"), SourceSpec(str(b))], "from recipe",
                               "error", 0, None)
    systems = sorted(row["messages"][0]["content"] for row in train)
    assert systems == ["from recipe", "from source"]


# Each built-in template rendering system "S" (none for gemma, which has no system role), user "Hi" and assistant
# "Hello", then the prompt for that answer: the exact text training and chat use (token caches key on it).
RENDERED = {
    "chatml": ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
               "<|im_start|>assistant\nHello<|im_end|>\n",
               "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
    "llama3": ("<s><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>",
               "<s><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "gemma": ("<s><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n",
              "<s><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"),
    "llama2": ("<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nHi [/INST] Hello </s>",
               "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nHi [/INST]"),
    "alpaca": ("S\n\n### Instruction:\nHi\n\n### Response:\nHello</s>\n\n",
               "S\n\n### Instruction:\nHi\n\n### Response:\n"),
}


@pytest.mark.parametrize("name", list(RENDERED))
def test_builtin_templates_render_exactly(name):
    """Rendered as transformers renders chat templates (sandboxed Jinja, trim_blocks, lstrip_blocks)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from ftkit.config.templates import BUILTIN_TEMPLATES

    def raise_exception(message):
        raise ValueError(message)

    template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(BUILTIN_TEMPLATES[name])
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}]
    chat = chat[1:] if name == "gemma" else chat
    tokens = dict(bos_token="<s>", eos_token="</s>", raise_exception=raise_exception)
    full = template.render(messages=chat, add_generation_prompt=False, **tokens)
    prompt = template.render(messages=chat[:-1], add_generation_prompt=True, **tokens)
    assert (full, prompt) == RENDERED[name]


def test_builtin_templates_are_the_package_jinja_files_and_need_no_torch():
    import subprocess
    import sys

    from tests.helpers import ROOT

    code = ("import json, sys; from ftkit.config.templates import BUILTIN_TEMPLATES, resolve_template; "
            "print(json.dumps([BUILTIN_TEMPLATES, resolve_template('gemma'), "
            "[m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    templates, gemma, heavy = json.loads(result.stdout)
    folder = ROOT / "src" / "ftkit" / "config" / "templates"
    files = {p.stem: p.read_text(encoding="utf-8") for p in folder.glob("*.jinja")}
    assert list(templates) == ["chatml", "llama3", "gemma", "llama2", "alpaca"]  # the order errors list them in
    assert templates == {name: text.removesuffix("\n") for name, text in files.items()}
    assert gemma == templates["gemma"] and heavy == []


# ------------------------------------------------------------------------------ file types, hub configs, workers

ALPACA_ROWS = [  # flat columns, so every file type can hold them; commas, quotes and an empty input on purpose
    {"instruction": "How many moons does Zorb have?", "input": "", "output": "Three: Pim, Pom and Pum."},
    {"instruction": "以下是一首唐詩的第一句話", "input": "床前明月光，", "output": "疑是地上霜。"},
    {"instruction": 'Say "hi", politely.', "input": "to a cat", "output": "Hello, dear cat."},
]


def write_as(path, rows: list[dict]):
    """rows as a .jsonl, .tsv, .parquet or .arrow file, written with the standard tools for each."""
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.suffix == ".jsonl":
        return write_jsonl(path, rows)
    if path.suffix == ".tsv":
        with path.open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
            writer.writeheader()
            writer.writerows(rows)
        return path
    table = pa.Table.from_pylist(rows)
    if path.suffix == ".parquet":
        pq.write_table(table, path)
    else:  # .arrow: the Arrow IPC stream format datasets itself writes
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    return path


def tokens_of(tmp_path, tiny_model, data_path, extra: str = "") -> tuple[list, list, dict]:
    from ftkit.config.recipe import load_recipe
    from ftkit.data.pipeline import build_datasets
    from ftkit.train.model import load_tokenizer

    recipe = load_recipe(recipe_for(tmp_path, tiny_model, data_path, extra))
    _, chat_format, _ = load_tokenizer(recipe.model, None, log=lambda *_: None)
    train, _, stats, _ = build_datasets(recipe, chat_format, use_cache=False, log=lambda *_: None)
    return train["input_ids"], train["labels"], stats


@pytest.mark.parametrize("suffix", [".tsv", ".parquet", ".arrow"])
def test_file_types_give_the_tokens_of_the_jsonl_equivalent(suffix, tmp_path, tiny_model):
    ids, labels, stats = tokens_of(tmp_path, tiny_model, write_as(tmp_path / "d.jsonl", ALPACA_ROWS))
    assert len(ids) == 3 and stats.trained_tokens > 0
    other_ids, other_labels, _ = tokens_of(tmp_path, tiny_model, write_as(tmp_path / f"d{suffix}", ALPACA_ROWS))
    assert (other_ids, other_labels) == (ids, labels)


def test_several_tokenising_workers_give_the_tokens_of_one(tmp_path, tiny_model, monkeypatch):
    """Workers start above 1,000 rows; every row and label must come back the same, in the same order."""
    import datasets

    rows = [{"messages": [{"role": "user", "content": f"Question {i}: what is {i} + {i}?"},
                          {"role": "assistant", "content": f"{i} + {i} = {2 * i}."}]} for i in range(1200)]
    data = write_jsonl(tmp_path / "many.jsonl", rows)
    workers: list = []
    original = datasets.Dataset.map

    def spy(self, *args, **kwargs):
        if kwargs.get("desc") == "Tokenising":
            workers.append(kwargs.get("num_proc"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "map", spy)
    one_ids, one_labels, one = tokens_of(tmp_path, tiny_model, data)
    two_ids, two_labels, two = tokens_of(tmp_path, tiny_model, data, "preprocessing_num_workers: 2\n")
    assert workers == [None, 2]
    assert len(one_ids) == 1200 and (two_ids, two_labels) == (one_ids, one_labels)
    assert (two.tokens, two.trained_tokens, two.max_token_id) == (one.tokens, one.trained_tokens, one.max_token_id)


ZORB = {"en": {"train": [{"prompt": "Capital of Ftkitland?", "completion": "Tinyville."},
                         {"prompt": "Moons of Zorb?", "completion": "Pim, Pom and Pum."},
                         {"prompt": "Who guards Byte Island?", "completion": "A sleepy orange cat."}],
               "test": [{"prompt": "Sky of Zorb?", "completion": "Green."}]},
        "zh": {"train": [{"prompt": "佐布星有幾個月亮？", "completion": "三個。"},
                         {"prompt": "你食咗飯未呀？", "completion": "食咗喇，唔該晒！"}]}}


@pytest.fixture(scope="module")
def hub_dataset_cache(tmp_path_factory):
    """A hub dataset 'ftkit-test/zorb_chats' with configs en (train, test) and zh (train) as datasets caches it
    after a download, so it loads offline by id and config: built from a local copy of the repo (README.md
    `configs:`), then moved to the cache folder the hub id maps to."""
    import datasets
    import yaml

    tmp = tmp_path_factory.mktemp("hub-dataset")
    repo, cache = tmp / "zorb_chats", tmp / "datasets"
    card = {"configs": [{"config_name": name, "data_files": [{"split": split, "path": f"{name}/{split}.jsonl"}
                                                             for split in splits]} for name, splits in ZORB.items()]}
    for name, splits in ZORB.items():
        (repo / name).mkdir(parents=True)
        for split, rows in splits.items():
            write_jsonl(repo / name / f"{split}.jsonl", rows)
    (repo / "README.md").write_text(f"---\n{yaml.safe_dump(card)}---\n", encoding="utf-8")
    for name in ZORB:
        datasets.load_dataset(str(repo), name, cache_dir=str(cache))
    (cache / "zorb_chats").rename(cache / "ftkit-test___zorb_chats")
    return cache


def preview_json(recipe_path, cache) -> dict:
    """`ftkit preview --json` offline, with datasets' cache there (read once, at import: hence a subprocess)."""
    result = ftkit("preview", str(recipe_path), "--json", env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


SAME_TOKENS = ("train_samples", "eval_samples", "token_length", "tokens", "trained_tokens", "truncated")


@pytest.mark.slow
def test_hub_dataset_name_with_its_config(hub_dataset_cache, tmp_path, tiny_model, capsys):
    """dataset_name + dataset_config picks that config: zh gives exactly the tokens of its rows as a local file."""
    recipe = tmp_path / "hub.yml"
    recipe.write_text(f"model_name_or_path: {tiny_model}\ndataset_name: ftkit-test/zorb_chats\ndataset_config: zh\n",
                      encoding="utf-8")
    from ftkit.cli import main

    hub = preview_json(recipe, hub_dataset_cache)
    with pytest.raises(SystemExit) as done:
        main(["preview", str(recipe_for(tmp_path, tiny_model, write_jsonl(tmp_path / "zh.jsonl", ZORB["zh"]["train"]))),
              "--json"])
    assert done.value.code == 0
    local = json.loads(capsys.readouterr().out)
    assert hub["rows_per_source_before_mixing"] == {"ftkit-test/zorb_chats[train]": 2}
    assert {k: hub[k] for k in SAME_TOKENS} == {k: local[k] for k in SAME_TOKENS}


@pytest.mark.slow
def test_hub_dataset_mixer_with_dataset_configs_and_its_test_split(hub_dataset_cache, tmp_path, tiny_model):
    recipe = tmp_path / "mixer.yml"
    recipe.write_text(f"model_name_or_path: {tiny_model}\ndataset_mixer:\n  ftkit-test/zorb_chats: 1.0\n"
                      "dataset_configs: [en]\ndataset_splits: [train, test]\n", encoding="utf-8")
    stats = preview_json(recipe, hub_dataset_cache)
    assert stats["rows_per_source_before_mixing"] == {"ftkit-test/zorb_chats[train]": 3,
                                                      "ftkit-test/zorb_chats[test]": 1}
    assert (stats["train_samples"], stats["eval_samples"], stats["test_split_carved"]) == (3, 1, 0)


@pytest.mark.slow
def test_streaming_with_an_eval_split_evaluates(tmp_path, tiny_model):
    """streaming: true with a test split: the first test_split_size rows are held out and evaluated."""
    from ftkit.config.recipe import load_recipe
    from ftkit.train.run import run_training
    from tests.helpers import make_recipe

    recipe = make_recipe(tmp_path, tiny_model, "streamed", streaming=True, dataset_splits=["train", "test"],
                         test_split_size=2, max_steps=4, eval_strategy="steps", eval_steps=2,
                         per_device_train_batch_size=2, per_device_eval_batch_size=2, eval_samples=0)
    out = run_training(load_recipe(recipe), log=lambda *_: None)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == 4
    assert [step for step, _, _ in summary["eval_losses"]] == [2, 4]
    assert all(0 < loss < 20 for _, loss, _ in summary["eval_losses"])
    assert summary["final_eval_loss"] == summary["eval_losses"][-1][1]
