"""Hostile input, verb by verb: each row is something a new user might feed ftkit, the exit code and the exact
lines it must get back, and the user's files byte-identical afterwards (nothing changed, added or removed).

Rows that fail before torch loads run the real console entry point in a subprocess, in a workspace with a
recipe, data, a model's config.json, a finished-looking LoRA run and an earlier merge output. Rows that read
data need a tokenizer: they run `ftkit.cli.main` in this process (the same entry point, imported once).
Rows that need a trained model are grouped in the slow tests at the end.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from ftkit.cli import main
from tests.helpers import ftkit, snapshot

CONFIG = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024}
QA = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
ROWS = "".join(json.dumps({"messages": QA}) + "\n" for _ in range(4))
RECIPE = "model_name_or_path: model\ndataset_mixer:\n  data.jsonl: 1.0\noutput_dir: runs/ok\nmax_steps: 2\n"
WORKSPACE = {  # relative path -> contents; every row starts from these
    "ok.yml": RECIPE,
    "data.jsonl": ROWS,
    "model/config.json": json.dumps(CONFIG),
    "runs/x/adapter_config.json": json.dumps({"base_model_name_or_path": "model", "r": 8, "lora_alpha": 16}),
    "runs/x/ftkit_owner.json": json.dumps({"written_by": "ftkit", "kind": "run"}),
    "runs/x/ftkit_run.json": json.dumps({"peft": True}),
    "merged/ftkit_owner.json": json.dumps({"written_by": "ftkit", "kind": "merge"}),
    "merged/ftkit_run.json": json.dumps({"peft": False}),
    "merged/config.json": json.dumps(CONFIG),
    "notes.txt": "my notes\n",
}
USAGE = "Usage: ftkit {verb} [OPTIONS]{args}\nTry 'ftkit {verb} --help' for help.\n\nError: {error}\n"
NOT_OURS = ("ftkit: error: --output '{out}' exists and was not written by ftkit predict; choose another --output "
            "(a rerun resumes only ftkit predict's own output)\n")


@dataclass
class Row:
    id: str
    args: list[str]
    stderr: str  # exact; "<ws>" stands for the workspace's absolute path
    files: dict = field(default_factory=dict)  # extra files (bytes or str), or None to delete one
    code: int = 2
    links: dict = field(default_factory=dict)  # symlink path -> target


def err(*lines: str) -> str:
    return "".join(f"ftkit: error: {line}\n" for line in lines)


def usage(verb: str, error: str, args: str = "") -> str:
    return USAGE.format(verb=verb, args=args, error=error)


def setup(root, row: Row):
    for name, content in {**WORKSPACE, **row.files}.items():
        path = root / name
        if content is None:
            path.unlink()
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    for link, target in row.links.items():
        (root / link).symlink_to(target)
    return root


def value(key: str, message: str) -> str:
    return err(f"--set {key}: '{key}': {message}")


BAD_INT = "Input should be a valid integer, unable to parse string as an integer"
CLI_ROWS = [
    Row("usage-unknown-option", ["validate", "ok.yml", "--bogus"],
        usage("validate", "No such option: --bogus", " {recipe}")),
    Row("usage-unknown-command", ["bogus"], "Usage: ftkit [OPTIONS] COMMAND [ARGS]...\nTry 'ftkit --help' for help."
        "\n\nError: No such command 'bogus'.\n"),
    Row("usage-missing-argument", ["validate"], usage("validate", "Missing argument 'recipe'.", " {recipe}")),
    Row("usage-port-not-a-number", ["serve", "--port", "abc"],
        usage("serve", f"Invalid value for '--port': {BAD_INT}")),
    Row("usage-missing-option", ["predict", "--input", "data.jsonl"], usage("predict", "Missing option '--output'.")),
    Row("usage-samples-not-a-number", ["preview", "ok.yml", "-n", "abc"],
        usage("preview", f"Invalid value for '-n' / '--samples': {BAD_INT}", " {recipe}")),
    Row("usage-samples-negative", ["preview", "ok.yml", "-n", "-1"],
        usage("preview", "Invalid value for '-n' / '--samples': Input should be greater than or equal to 0",
              " {recipe}")),
    Row("usage-merge-without-adapter", ["merge", "--output", "out"], usage("merge", "Missing option '--adapter'.")),
    Row("set-without-equals", ["validate", "ok.yml", "--set", "oops"],
        err("--set 'oops': expected KEY=VALUE, e.g. --set learning_rate=2e-4")),
    Row("num-processes-without-launcher", ["train", "ok.yml", "--num-processes", "2"],
        err("--num-processes and --machine-rank need --launcher CONFIG (e.g. accelerate_configs/ddp.yaml)")),
]

RECIPE_ROWS = [
    Row("recipe-not-utf8", ["validate", "bad.yml"], err("bad.yml:2: not UTF-8 text (byte 0xe9); save the recipe file "
        "as UTF-8"), files={"bad.yml": b"model_name_or_path: model\nsystem_prompt: caf\xe9\n"}),
    Row("recipe-binary", ["validate", "logo.png"], err("logo.png: a binary file, not a recipe file"),
        files={"logo.png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"}),
    Row("recipe-binary-utf8", ["validate", "blob.yml"], err("blob.yml: a binary file, not a recipe file"),
        files={"blob.yml": b"model_name_or_path: model\n\x00\x00\x00"}),
    Row("recipe-control-character", ["validate", "bell.yml"], err("bell.yml:2: not valid YAML: control character "
        "0x07 is not allowed (remove it, or write it as an escape inside double quotes)"),
        files={"bell.yml": "model_name_or_path: model\nsystem_prompt: ding\x07\n"}),
    Row("recipe-tab-indent", ["validate", "tab.yml"], err("tab.yml:3: not valid YAML: found character '\\t' that "
        "cannot start any token"), files={"tab.yml": "model_name_or_path: model\ndataset_mixer:\n\tdata.jsonl: 1\n"}),
    Row("recipe-is-a-directory", ["validate", "model"], err("model: is a directory, not a recipe file")),
    Row("recipe-missing", ["validate", "nope.yml"], err("nope.yml: recipe file not found")),
    Row("recipe-empty", ["validate", "empty.yml"], err("empty.yml: the recipe is empty; it needs at least "
        "model_name_or_path and a dataset"), files={"empty.yml": ""}),
    Row("recipe-only-comments", ["validate", "c.yml"], err("c.yml: the recipe is empty; it needs at least "
        "model_name_or_path and a dataset"), files={"c.yml": "# model_name_or_path: model\n"}),
    Row("recipe-is-a-list", ["validate", "l.yml"], err("l.yml: a recipe is a mapping of keys to values, got list"), files={"l.yml": "- model_name_or_path: model\n"}),
    Row("recipe-is-a-scalar", ["validate", "s.yml"], err("s.yml: a recipe is a mapping of keys to values, got str"), files={"s.yml": "model\n"}),
    Row("recipe-duplicate-key", ["validate", "ok.yml"], err("ok.yml:6: key 'max_steps' is given twice (first on "
        "line 5); keep one"), files={"ok.yml": RECIPE + "max_steps: 3\n"}),
    Row("recipe-unknown-key", ["validate", "ok.yml"], err("ok.yml:6: unknown key 'learning_rat' (did you mean "
        "'learning_rate'? see: ftkit keys learning_rate)"), files={"ok.yml": RECIPE + "learning_rat: 0.1\n"}),
]


def validate(*sets: str) -> list[str]:
    return ["validate", "ok.yml", *[arg for pair in sets for arg in ("--set", pair)]]


INTEGRATIONS = ("use one or more of: azure_ml, clearml, codecarbon, comet_ml, dagshub, dvclive, flyte, kubeflow, "
                "mlflow, neptune, swanlab, tensorboard, trackio, wandb, or all, or none")
MIXTURE = "dataset_mixer=null"
VALUE_ROWS = [
    Row("max-steps-below-minus-one", validate("max_steps=-5"),
        value("max_steps", "must be a number of steps, or -1 to train for num_train_epochs; got -5")),
    Row("learning-rate-nan", validate("learning_rate=.nan"),
        value("learning_rate", "must be a finite number, got nan")),
    Row("learning-rate-inf-in-file", ["validate", "ok.yml"], err("ok.yml:6: 'learning_rate': must be a finite number, "
        "got inf"), files={"ok.yml": RECIPE + "learning_rate: .inf\n"}),
    Row("epochs-nan", validate("num_train_epochs=.nan"), value("num_train_epochs", "must be a finite number, got nan")),
    Row("learning-rate-huge-int", validate("learning_rate=" + "9" * 400), value(
        "learning_rate", f"expected float, got int {'9' * 400}")),
    Row("max-steps-beyond-int64", validate("max_steps=100000000000000000000"), value(
        "max_steps", "100000000000000000000 is out of range (the largest accepted number is 9223372036854775807)")),
    Row("seed-negative", validate("seed=-1"), value("seed", "must be in [0, 2**32), got -1")),
    Row("eval-samples-negative", validate("eval_samples=-3"), value(
        "eval_samples", "must be >= 0 (0 answers no eval prompts), got -3")),
    Row("eval-samples-max-new-tokens-zero", validate("eval_samples_max_new_tokens=0"), value(
        "eval_samples_max_new_tokens", "must be >= 1, got 0")),
    Row("method-a-list", validate("method=[dpo]"), value("method", "expected str, got list ['dpo']")),
    Row("method-alias-a-mapping", ["validate", "ok.yml"], err("ok.yml:6: 'method': expected str, got dict "
        "{'dpo': True}"), files={"ok.yml": RECIPE + "rl: {dpo: true}\n"}),
    Row("report-to-unknown", validate("report_to=foo"), value(
        "report_to", f"'foo' is not a reporting integration; {INTEGRATIONS}")),
    Row("report-to-typo-in-list", validate("report_to=[wandb, tensorbord]"), value(
        "report_to", f"'tensorbord' is not a reporting integration (did you mean 'tensorboard'?); {INTEGRATIONS}")),
    Row("model-mistyped-local-path", validate("model_name_or_path=models/tny"), value(
        "model_name_or_path", "'models/tny' is not a directory (did you mean 'models/tiny'?)"),
        files={"models/tiny/config.json": json.dumps(CONFIG)}),
    Row("model-not-built-yet", validate("model_name_or_path=models/tiny"), value(
        "model_name_or_path", "'models/tiny' is not a directory (relative to <ws>)")),
    Row("model-missing-under-local-folder", validate("model_name_or_path=checkpoints/best"), value(
        "model_name_or_path", "'checkpoints/best' is not a directory (for a hub model use its id, e.g. "
        "google/gemma-2b)"), files={"checkpoints/other.txt": "x"}),
    Row("model-dir-without-config", validate("model_name_or_path=empty_model"), value(
        "model_name_or_path", "'empty_model' has no config.json, so it is not a model directory"),
        files={"empty_model/weights.bin": b"\0"}),
    Row("model-is-a-lora-run", validate("model_name_or_path=runs/x"), value(
        "model_name_or_path", "'runs/x' is a LoRA adapter (adapter_config.json), not a model; use its base model, "
        "or merge it first: ftkit merge --adapter runs/x --output DIR")),
    Row("model-is-an-unfinished-run", validate("method=dpo", "model_name_or_path=runs/u"), value(
        "model_name_or_path", "'runs/u': this run did not finish (no ftkit_run.json); resume it with `ftkit train "
        "RECIPE --resume`"), files={"runs/u/adapter_config.json": "{}",
                                    "runs/u/ftkit_owner.json": json.dumps({"written_by": "ftkit", "kind": "run"})}),
    Row("tokenizer-dir-without-tokenizer", validate("tokenizer_name_or_path=model"), value(
        "tokenizer_name_or_path", "'model' has no tokenizer_config.json or tokenizer.json, so it is not a tokenizer "
        "directory")),
    Row("test-split-half", validate("test_split_size=0.5"), value(
        "test_split_size", "0.5 would leave no more training rows than eval rows; use a fraction below 0.5 (e.g. 0.1) "
        "or a row count")),
    Row("test-split-fractional-count", validate("test_split_size=1.5"), value(
        "test_split_size", "1.5 is neither a fraction below 1 nor a whole number of rows")),
    Row("test-split-fraction-when-streaming", validate("streaming=true", "test_split_size=0.1"), value(
        "test_split_size", "0.1 is a fraction, and with streaming: true the stream's length is unknown: give a row "
        "count (e.g. 100)")),
    Row("resume-from-missing-path", validate("resume_from_checkpoint=runs/ok/checkpoint-9"), value(
        "resume_from_checkpoint", "'runs/ok/checkpoint-9' does not exist; give a checkpoint-N directory, or true for "
        "the newest checkpoint in output_dir")),
    Row("resume-from-non-checkpoint", validate("resume_from_checkpoint=model"), value(
        "resume_from_checkpoint", "'model' is not a complete checkpoint directory (no trainer_state.json)")),
    Row("output-dir-is-a-file", validate("output_dir=notes.txt"),
        err("output_dir 'notes.txt' is a file, not a directory; choose another output_dir")),
    Row("output-dir-under-a-file", validate("output_dir=notes.txt/run"),
        err("output_dir 'notes.txt/run' cannot be written (notes.txt is not writable); choose another output_dir")),
    Row("output-dir-is-the-model", validate("output_dir=model"), value(
        "output_dir", "'model' is the model_name_or_path directory 'model'; choose another output_dir")),
    Row("output-dir-contains-the-model", validate("output_dir=.", "model_name_or_path=models/tiny"), value(
        "output_dir", "'.' contains the model_name_or_path directory 'models/tiny'; choose another output_dir"),
        files={"models/tiny/config.json": json.dumps(CONFIG)}),
    Row("lora-keys-without-peft", validate("use_peft=false", "lora_r=8", "lora_alpha=4"),
        "note: lora_r, lora_alpha are ignored without use_peft: true\n", code=0),
    Row("mixer-weight-nan", validate("dataset_mixer={data.jsonl: .nan}"), value(
        "dataset_mixer", "weight of 'data.jsonl' must be a number >= 0, got nan")),
    Row("mixer-weight-a-list", validate("dataset_mixer={data.jsonl: [1]}"), value(
        "dataset_mixer", "weight of 'data.jsonl' must be a number >= 0, got [1]")),
    Row("mixer-weight-a-mapping", ["validate", "ok.yml"], err("ok.yml:2: 'dataset_mixer': weight of 'data.jsonl' "
        "must be a number >= 0, got {'rows': 2}"), files={"ok.yml": RECIPE.replace("1.0", "{rows: 2}")}),
    Row("mixer-a-list", ["validate", "ok.yml"], err("ok.yml:2: 'dataset_mixer': expected dict, got list "
        "['data.jsonl']"), files={"ok.yml": RECIPE.replace("dataset_mixer:\n  data.jsonl: 1.0", "dataset_mixer: [data.jsonl]")}),
    Row("mixer-source-missing", validate("dataset_mixer={data/train.jsonl: 1}"), value(
        "dataset_mixer", "data source 'data/train.jsonl' does not exist")),
    Row("mixer-source-not-a-data-file", validate("dataset_mixer={notes.txt: 1}"), value(
        "dataset_mixer", "notes.txt: not a data file ftkit reads (a name ending in .json, .jsonl, .csv, .tsv, "
        ".parquet, .arrow)")),
    Row("mixer-folder-without-data", validate("dataset_mixer={texts: 1}"), value(
        "dataset_mixer", "texts: folder has no data files (.json, .jsonl, .csv, .tsv, .parquet, .arrow)"),
        files={"texts/readme.md": "my corpus, to be converted\n"}),
    Row("configs-count-mismatch", validate("dataset_configs=[a, b]"), value(
        "dataset_configs", "needs one entry per dataset_mixer source")),
    Row("mixture-split-not-a-name", validate(MIXTURE, "dataset_mixture=[{id: data.jsonl, split: 5}]"), value(
        "dataset_mixture", "entry 1: 'split' must be a split name or a list of them, got 5")),
    Row("mixture-weight-not-a-number", validate(MIXTURE, "dataset_mixture=[{id: data.jsonl, weight: lots}]"), value(
        "dataset_mixture", "entry 1: 'weight' must be a number >= 0, got 'lots'")),
    Row("mixture-columns-not-names", validate(MIXTURE, "dataset_mixture=[{id: data.jsonl, columns: 5}]"), value(
        "dataset_mixture", "entry 1: 'columns' must be a list of column names or a mapping {theirs: ours}, got 5")),
    Row("mixture-id-not-text", validate(MIXTURE, "dataset_mixture=[{id: [data.jsonl]}]"), value(
        "dataset_mixture", "entry 1: 'id' must be text, got ['data.jsonl']")),
    Row("mixture-unknown-option", validate(MIXTURE, "dataset_mixture={datasets: [{id: data.jsonl}], sed: 1}"), value(
        "dataset_mixture", "unknown field(s) sed; known: datasets, seed, test_split_size")),
    Row("chat-template-binary-file", validate("chat_template=notes.bin"), value(
        "chat_template", "notes.bin: a binary file, not a chat template (Jinja text)"), files={"notes.bin": b"\0\1"}),
]

TRAIN_ROWS = [
    Row("train-recipe-not-utf8", ["train", "bad.yml"], err("bad.yml:1: not UTF-8 text (byte 0xff); save the recipe "
        "file as UTF-8"), files={"bad.yml": b"\xff\xfemodel_name_or_path: model\n"}),
    Row("train-over-the-base-model", ["train", "ok.yml", "--set", "output_dir=model", "--set",
                                      "overwrite_output_dir=true"],
        value("output_dir", "'model' is the model_name_or_path directory 'model'; choose another output_dir")),
    Row("train-overwrite-into-another-trainers-output", ["train", "ok.yml", "--set", "output_dir=hf", "--set",
                                                         "overwrite_output_dir=true"],
        err("output_dir 'hf' holds checkpoint directories ftkit did not write (checkpoint-500); training would save "
            "and rotate its own checkpoint-N beside them: choose another output_dir"),
        files={"hf/config.json": "{}", "hf/model.safetensors": b"weights", "hf/checkpoint-500/trainer_state.json": "{}"}),
    Row("train-into-another-trainers-output", ["train", "ok.yml", "--set", "output_dir=hf"],
        err("output_dir 'hf' holds files ftkit did not write (checkpoint-500, config.json, model.safetensors); choose "
            "another output_dir, or set overwrite_output_dir: true to train into it (only ftkit's own files there "
            "are replaced)"),
        files={"hf/config.json": "{}", "hf/model.safetensors": b"weights", "hf/checkpoint-500/trainer_state.json": "{}"}),
    Row("train-launcher-config-not-utf8", ["train", "ok.yml", "--launcher", "acc.yaml"], err(
        "acc.yaml:2: not UTF-8 text (byte 0xff); save the accelerate config as UTF-8"),
        files={"acc.yaml": b"distributed_type: MULTI_GPU\nnum_processes: \xff\n"}),
    Row("train-resume-from-missing-path", ["train", "ok.yml", "--set", "resume_from_checkpoint=ckpt"], value(
        "resume_from_checkpoint", "'ckpt' does not exist; give a checkpoint-N directory, or true for the newest "
        "checkpoint in output_dir")),
]

ESTIMATE_ROWS = [
    Row("estimate-config-is-a-list", ["estimate", "ok.yml"], err("model/config.json: expected a JSON object of model "
        "settings, got list"), files={"model/config.json": "[1]"}),
    Row("estimate-config-lacks-sizes", ["estimate", "ok.yml"], err("model/config.json lacks hidden_size, "
        "num_hidden_layers, num_attention_heads or vocab_size: not a decoder-only language model ftkit can estimate"),
        files={"model/config.json": '{"model_type": "llama"}'}),
    Row("estimate-zero-heads", ["estimate", "ok.yml"], err("model/config.json: hidden_size 64, num_hidden_layers 2, "
        "num_attention_heads 0 and vocab_size 1024 must all be positive"),
        files={"model/config.json": json.dumps({**CONFIG, "num_attention_heads": 0})}),
    Row("estimate-size-not-a-number", ["estimate", "ok.yml"], err(
        'model/config.json: hidden_size is "64"; it must be a whole number'),
        files={"model/config.json": json.dumps({**CONFIG, "hidden_size": "64"})}),
    Row("estimate-size-a-boolean", ["estimate", "ok.yml"], err(
        "model/config.json: num_hidden_layers is true; it must be a whole number"),
        files={"model/config.json": json.dumps({**CONFIG, "num_hidden_layers": True})}),
    Row("estimate-kv-heads-do-not-divide", ["estimate", "ok.yml"], err(
        "model/config.json: num_key_value_heads 3 must be positive and divide num_attention_heads 4"),
        files={"model/config.json": json.dumps({**CONFIG, "num_key_value_heads": 3})}),
    Row("estimate-zero-kv-heads", ["estimate", "ok.yml"], err(
        "model/config.json: num_key_value_heads 0 must be positive and divide num_attention_heads 4"),
        files={"model/config.json": json.dumps({**CONFIG, "num_key_value_heads": 0})}),
    Row("estimate-hidden-not-split-by-heads", ["estimate", "ok.yml"], err(
        "model/config.json: hidden_size 66 is not a multiple of num_attention_heads 4, and there is no head_dim"),
        files={"model/config.json": json.dumps({**CONFIG, "hidden_size": 66})}),
    Row("estimate-config-not-json", ["estimate", "ok.yml"], err("model/config.json: not readable JSON (Expecting "
        "property name enclosed in double quotes: line 1 column 2 (char 1))"), files={"model/config.json": "{"}),
]


def predict(output: str, *extra: str, data: str = "data.jsonl") -> list[str]:
    return ["predict", "--adapter", "runs/x", "--input", data, "--output", output, *extra]


def merge(output: str, *extra: str) -> list[str]:
    return ["merge", "--adapter", "runs/x", "--output", output, *extra]


INSIDE = "; choose a directory outside it"
ONE_ROW = {"one.jsonl": json.dumps({"messages": QA}) + "\n"}  # a one-line input: the old code rewrote it as "torn"
PREDICT_ROWS = [
    Row("predict-output-is-input", predict("one.jsonl", data="one.jsonl"), err("--output 'one.jsonl' is the --input "
        "file; choose another --output (predictions never replace their input)"), files=ONE_ROW),
    Row("predict-output-is-input-by-absolute-path", predict("<ws>/one.jsonl", data="one.jsonl"), err(
        "--output '<ws>/one.jsonl' is the --input file; choose another --output (predictions never replace their "
        "input)"), files=ONE_ROW),
    Row("predict-output-is-input-by-symlink", predict("preds.jsonl", data="one.jsonl"), err("--output 'preds.jsonl' "
        "is the --input file; choose another --output (predictions never replace their input)"), files=ONE_ROW,
        links={"preds.jsonl": "one.jsonl"}),
    Row("predict-output-is-input-by-relative-path", predict("../ws/one.jsonl", data="one.jsonl"), err(
        "--output '../ws/one.jsonl' is the --input file; choose another --output (predictions never replace their "
        "input)"), files=ONE_ROW),
    Row("predict-output-is-a-user-file", predict("notes.txt"), NOT_OURS.format(out="notes.txt")),
    Row("predict-output-is-a-user-file-without-newline", predict("todo.jsonl"), NOT_OURS.format(out="todo.jsonl"),
        files={"todo.jsonl": '{"row": 1, "output": "my own label"}'}),
    Row("predict-output-is-another-tools-jsonl", predict("other.jsonl"), NOT_OURS.format(out="other.jsonl"),
        files={"other.jsonl": '{"row": 1, "prompt": "p", "output": "o", "reference": null}\n'}),
    Row("predict-output-is-a-directory", predict("runs"), err("--output 'runs' is a directory; give a file name, "
        "e.g. runs/predictions.jsonl")),
    Row("predict-output-under-a-file", predict("notes.txt/preds.jsonl"), err("--output 'notes.txt/preds.jsonl' "
        "cannot be written (notes.txt is not a writable folder); choose another --output")),
    Row("predict-input-is-a-directory", predict("preds.jsonl", data="runs"), err("runs: is a directory; --input "
        "takes one data file (.json, .jsonl, .csv, .tsv, .parquet, .arrow)")),
    Row("predict-input-not-utf8", predict("preds.jsonl", data="latin1.jsonl"), err(
        "latin1.jsonl:2: not UTF-8 text (byte 0xe9); save the data file as UTF-8"),
        files={"latin1.jsonl": '{"prompt": "q"}\n{"prompt": "café"}\n'.encode("latin-1")}),
    Row("predict-input-empty", predict("preds.jsonl", data="empty.jsonl"), err(
        "empty.jsonl: the file is empty; it needs at least one row"), files={"empty.jsonl": ""}),
    Row("predict-input-row-not-an-object", predict("preds.jsonl", data="list.json"), err(
        "list.json: row 2: expected a JSON object ({...}), got a string"),
        files={"list.json": json.dumps([{"prompt": "q"}, "just text"])}),
    Row("predict-input-image-part", predict("preds.jsonl", data="photos.jsonl"), err(
        "photos.jsonl: row 2: turn 1: a content part of type 'image_url' is not text; ftkit trains text-only models "
        "(images, audio and files are not supported yet)"), files={"photos.jsonl": ROWS[:ROWS.index("\n") + 1] + json.dumps(
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}]}) + "\n"}),
    Row("predict-input-row-without-question", predict("preds.jsonl"), err(
        "data.jsonl: row 5: the conversation does not end with a user turn (or a tool result) to answer"),
        files={"data.jsonl": ROWS + json.dumps({"messages": QA[1:]}) + "\n"}),
    Row("predict-input-unknown-type", predict("preds.jsonl", data="notes.txt"), err(
        "notes.txt: expected one of .json, .jsonl, .csv, .tsv, .parquet, .arrow")),
    Row("predict-without-adapter-or-model", ["predict", "--input", "data.jsonl", "--output", "preds.jsonl"],
        err("give exactly one of --adapter RUN_DIR or --model MODEL_DIR")),
    Row("predict-system-not-utf8", predict("preds.jsonl", "--system", "caf\udce9"), err(
        "--system is not UTF-8 text (byte 0xe9 at character 4)")),
    Row("predict-batch-size-zero", predict("preds.jsonl", "--batch-size", "0"), err("--batch-size must be at least 1")),
]

MERGE_ROWS = [
    Row("merge-into-the-adapter", merge("runs/x", "--overwrite"), err(
        f"--output 'runs/x' is the adapter being merged (runs/x){INSIDE}")),
    Row("merge-into-the-runs-folder", merge("runs", "--overwrite"), err(
        f"--output 'runs' contains the adapter being merged (runs/x){INSIDE}")),
    Row("merge-into-the-working-directory", merge(".", "--overwrite"), err(
        f"--output '.' contains the adapter being merged (runs/x){INSIDE}")),
    Row("merge-into-the-base-model", merge("model", "--overwrite"), err(
        f"--output 'model' is the base model (model){INSIDE}")),
    Row("merge-over-a-user-folder", merge("docs", "--overwrite"), err(
        "docs: already exists and holds files ftkit merge did not write (a.md, b.md); choose another --output "
        "(--overwrite replaces only an earlier ftkit merge output)"), files={"docs/a.md": "a", "docs/b.md": "b"}),
    Row("merge-into-a-user-folder", merge("docs"), err(
        "docs: already exists and holds files ftkit merge did not write (a.md); choose another --output "
        "(--overwrite replaces only an earlier ftkit merge output)"), files={"docs/a.md": "a"}),
    Row("merge-over-a-merge-with-user-files", merge("merged", "--overwrite"), err(
        "merged: besides the earlier merge it holds my-eval.txt, which --overwrite would delete; move them out, or "
        "choose another --output"), files={"merged/my-eval.txt": "0.93"}),
    Row("merge-over-a-merge-without-overwrite", merge("merged"), err(
        "merged: already exists and is not empty; choose another --output or pass --overwrite")),
    Row("merge-into-a-file", merge("notes.txt"), err(
        "--output 'notes.txt' is a file, not a directory; choose another --output")),
    Row("merge-under-a-file", merge("notes.txt/merged"), err(
        "--output 'notes.txt/merged' cannot be written (notes.txt is not writable); choose another --output")),
    Row("merge-shard-size-not-a-size", merge("out", "--max-shard-size", "big"), err(
        "--max-shard-size 'big': expected a size such as 5GB or 500MB (KB, MB, GB, TB)")),
    Row("merge-adapter-config-without-base", merge("out"), err(
        "runs/x/adapter_config.json: not a readable adapter config (no base_model_name_or_path); pass --base with the "
        "base model"), files={"runs/x/adapter_config.json": '{"r": 8}'}),
    Row("merge-a-full-model", ["merge", "--adapter", "model", "--output", "out"], err(
        "model: no adapter_config.json, so nothing to merge (a full fine-tune is already a standalone model: ftkit "
        "chat --model DIR)")),
    Row("merge-missing-adapter", ["merge", "--adapter", "runs/y", "--output", "out"], err("runs/y: no such directory")),
]

CHAT_SERVE_ROWS = [
    Row("chat-prompt-not-utf8", ["chat", "--adapter", "runs/x", "--prompt", "caf\udce9"], err(
        "--prompt is not UTF-8 text (byte 0xe9 at character 4)")),
    Row("chat-prompt-empty", ["chat", "--adapter", "runs/x", "--prompt", " "], err(
        "--prompt is empty: give the message to answer, or leave --prompt out for a conversation")),
    Row("chat-temperature-nan", ["chat", "--adapter", "runs/x", "--temperature", "nan"], err(
        "temperature must be a finite number, got nan")),
    Row("chat-seed-negative", ["chat", "--adapter", "runs/x", "--seed", "-1"], err(
        "seed must be in [0, 2**32), got -1")),
    Row("chat-without-adapter-or-model", ["chat", "--prompt", "hi"], err(
        "give exactly one of --adapter RUN_DIR or --model MODEL_DIR")),
    Row("serve-port-out-of-range", ["serve", "--adapter", "runs/x", "--port", "70000"], err(
        "--port must be in 0..65535 (0: any free port), got 70000")),
    Row("serve-port-negative", ["serve", "--adapter", "runs/x", "--port", "-1"], err(
        "--port must be in 0..65535 (0: any free port), got -1")),
    Row("serve-queue-negative", ["serve", "--adapter", "runs/x", "--queue-size", "-1"], err(
        "--queue-size must be 0 or more")),
]
FAST_ROWS = [*CLI_ROWS, *RECIPE_ROWS, *VALUE_ROWS, *TRAIN_ROWS, *ESTIMATE_ROWS, *PREDICT_ROWS, *MERGE_ROWS,
             *CHAT_SERVE_ROWS]


@pytest.mark.parametrize("row", FAST_ROWS, ids=lambda row: row.id)
def test_bad_input_is_one_line_and_changes_nothing(row, tmp_path):
    ws = setup(tmp_path / "ws", row)
    before = snapshot(ws)
    args = [arg.replace("<ws>", str(ws)) for arg in row.args]
    result = ftkit(*args, cwd=ws)
    assert (result.returncode, result.stderr) == (row.code, row.stderr.replace("<ws>", str(ws)))
    assert snapshot(ws) == before


def rows_of(*conversations) -> str:
    return "".join(json.dumps({"messages": messages}) + "\n" for messages in conversations)


SKIP = " (set on_bad_rows: skip to skip such rows)"
SYSTEM = {"role": "system", "content": "s"}
DATA_ROWS = [  # files, recipe lines after the model, expected stderr
    Row("data-not-utf8", [], err("data.jsonl:5: not UTF-8 text (byte 0xff); save the data file as UTF-8"),
        files={"data.jsonl": ROWS.encode()[:-1] + b'\n{"messages": "\xff"}\n'}),
    Row("data-csv-not-utf8", ["data.csv"], err("data.csv:3: not UTF-8 text (byte 0xe9); save the data file as UTF-8"),
        files={"data.csv": "prompt,completion\nq,a\n".encode() + "q,café\n".encode("latin-1")}),
    Row("data-empty", [], err("data.jsonl: the file is empty; it needs at least one row"), files={"data.jsonl": ""}),
    Row("data-blank-lines-only", [], err("data.jsonl: the file is empty; it needs at least one row"),
        files={"data.jsonl": "\n  \n\n"}),
    Row("data-empty-json-array", ["data.json"], err("data.json: no rows"), files={"data.json": "[]\n"}),
    Row("data-csv-header-only", ["data.csv"], err("data.csv: no rows"), files={"data.csv": "prompt,completion\n"}),
    Row("data-assistant-speaks-first", [], err("source 'data.jsonl', row 2: turn 1: the conversation starts with an "
        "assistant turn; an answer needs a user turn before it" + SKIP),
        files={"data.jsonl": rows_of(QA, QA[::-1] + [QA[1]])}),
    Row("data-assistant-first-after-system", [], err("source 'data.jsonl', row 1: turn 2: the conversation starts "
        "with an assistant turn; an answer needs a user turn before it" + SKIP),
        files={"data.jsonl": rows_of([SYSTEM, QA[1], QA[0], QA[1]])}),
    Row("data-json-array-row-not-an-object", ["data.json"], err("data.json: row 3: expected a JSON object ({...}), "
        "got null"), files={"data.json": json.dumps([{"messages": QA}, {"messages": QA}, None])}),
    Row("data-json-array-of-numbers", ["data.json"], err("data.json: row 1: expected a JSON object ({...}), got a "
        "number"), files={"data.json": "[1, 2, 3]"}),
    Row("data-json-array-row-without-answer", ["data.json"], err("source 'data.json', row 2: no assistant turn: "
        "nothing to learn from" + SKIP), files={"data.json": json.dumps([{"messages": QA}, {"messages": QA[:1]}])}),
    Row("data-json-array-rows-of-two-shapes", ["data.json"], err("source 'data.json', row 2: 'messages' is not a "
        "list of {role, content}" + SKIP), files={"data.json": json.dumps([{"messages": QA}, {"messages": QA[0]}])}),
    Row("data-line-not-an-object", [], err("data.jsonl:2: expected a JSON object ({...}) per line, got a string"),
        files={"data.jsonl": rows_of(QA) + '"q and a"\n'}),
    Row("data-line-nested-too-deeply", [], err("data.jsonl:2: not valid JSON: nested too deeply"),
        files={"data.jsonl": rows_of(QA) + "[" * 100_000 + "]" * 100_000 + "\n"}),
    Row("data-only-weight-0-turns", [], err("no training samples left after tokenising: 2 with no token to train "
        "on (only weight-0 turns, train_on leaves nothing, or max_length cuts the answer off; `ftkit preview` shows "
        "the masks)"), files={"data.jsonl": rows_of(*[[QA[0], {**QA[1], "weight": 0}]] * 2)}),
    Row("data-every-row-too-long", ["data.jsonl", "max_length: 8", "overlong: drop"], err("no training samples left "
        "after tokenising: 4 longer than max_length (raise max_length, or overlong: truncate)")),
    Row("data-line-not-json", [], err("data.jsonl:2: not valid JSON: Expecting value (column 15)"),
        files={"data.jsonl": rows_of(QA) + '{"messages": [}\n'}),
    Row("data-parquet-not-parquet", ["data.parquet"], err("data.parquet: could not be read as parquet: Parquet magic "
        "bytes not found in footer. Either the file is corrupted or this is not a parquet file."),
        files={"data.parquet": b"PAR1 not really\n"}),
    Row("data-test-split-as-big-as-train", ["data.jsonl", "test_split_size: 2"], err(
        "test_split_size: 2 eval rows out of 4 would leave no more training rows than eval rows; use at most 1 (or a "
        "fraction such as 0.1)")),
    Row("data-every-row-skipped", ["data.jsonl", "on_bad_rows: skip"], err(
        "no training rows: all 2 rows were skipped as bad (on_bad_rows: skip); set on_bad_rows: error to see the "
        "first one"), files={"data.jsonl": rows_of(QA[:1], QA[:1])}),
    Row("data-column-rename-clash", ["mixture"], err(
        "source 'data.jsonl': columns: renaming to ['prompt'] would replace existing columns of that name; map them "
        "too (or keep a list of columns)"),
        files={"data.jsonl": json.dumps({"question": "q", "prompt": "p", "completion": "c"}) + "\n"}),
]


def data_recipe(model, source: str = "data.jsonl", *lines: str) -> str:
    if source == "mixture":
        data = "dataset_mixture:\n  - id: data.jsonl\n    columns: {question: prompt}\n"
    else:
        data = f"dataset_mixer:\n  {source}: 1.0\n"
    return f"model_name_or_path: {model}\n{data}chat_template: chatml\n" + "".join(f"{line}\n" for line in lines)


@pytest.mark.parametrize("row", DATA_ROWS, ids=lambda row: row.id)
def test_bad_data_is_one_line_and_changes_nothing(row, tiny_model, tmp_path, monkeypatch, capfd):
    """In this process: reading data needs the tokenizer, which would cost each subprocess seconds."""
    ws = setup(tmp_path / "ws", Row(row.id, [], "", files={"r.yml": data_recipe(tiny_model, *row.args), **row.files}))
    before = snapshot(ws)
    monkeypatch.chdir(ws)
    capfd.readouterr()
    with pytest.raises(SystemExit) as done:
        main(["preview", "r.yml", "--json"])
    assert (done.value.code, capfd.readouterr().err) == (row.code, row.stderr)
    assert snapshot(ws) == before


@pytest.mark.slow
def test_chat_repl_refuses_bad_settings_and_keeps_the_old_ones(trained_run):
    script = b"\n".join([b"/set max_new_tokens=0", b"/set temperature=nan", b"/set seed=-1", b"/set top_k=many",
                         b"caf\xe9?", b"/params"]) + b"\n"
    result = ftkit("chat", "--adapter", str(trained_run), "--max-new-tokens", "7", stdin=script)
    assert result.returncode == 0 and result.stdout == ""  # nothing was sent to the model
    assert result.stderr.splitlines() == [
        "max_new_tokens must be at least 1", "temperature must be a finite number, got nan",
        "seed must be in [0, 2**32), got -1", "top_k: 'many' is not a valid int",
        "that line is not UTF-8 text (byte 0xe9 at character 4); not sent",
        "max_new_tokens=7 temperature=0.7 top_p=0.9 top_k=50 repetition_penalty=1.0 no_repeat_ngram_size=0 "
        "greedy=False seed=None min_new_tokens=0"]


@pytest.mark.slow
def test_merge_overwrite_replaces_only_a_complete_merge(trained_run, tmp_path, monkeypatch):
    """An earlier merge output stays as it was until the new one is complete; then it is replaced whole."""
    from ftkit.commands import merge

    out, mine = tmp_path / "merged", tmp_path / "mine.txt"
    mine.write_text("next to the merge\n", encoding="utf-8")
    merge.run_merge(trained_run, out, log=lambda *_: None)
    first, before = json.loads((out / "ftkit_run.json").read_text()), snapshot(tmp_path)
    assert json.loads((out / "ftkit_owner.json").read_text())["kind"] == "merge" and first["dtype"] == "float32"

    def disk_full(*_):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(merge, "copy_run_files", disk_full)
        with pytest.raises(OSError, match="No space left"):
            merge.run_merge(trained_run, out, dtype="bfloat16", overwrite=True, log=lambda *_: None)
    assert snapshot(tmp_path) == before  # old merge intact, the half-written one removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "mine.txt"]

    merge.run_merge(trained_run, out, dtype="bfloat16", overwrite=True, log=lambda *_: None)
    assert json.loads((out / "ftkit_run.json").read_text())["dtype"] == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "mine.txt"]
    assert mine.read_text(encoding="utf-8") == "next to the merge\n"


def test_debug_shows_the_traceback_and_keeps_the_exit_status(tmp_path, monkeypatch, capsys):
    """--debug adds the traceback to the one line; a bad input still exits 2, not 1."""
    from tests.helpers import cli

    monkeypatch.chdir(tmp_path)
    code, out, err = cli(["--debug", "validate", "missing.yml"], capsys)
    assert (code, out) == (2, "")
    assert err.startswith("Traceback (most recent call last):\n")
    assert err.splitlines()[-1] == "ftkit: error: missing.yml: recipe file not found"
