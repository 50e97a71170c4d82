"""Test helpers shared by the test modules: the CLI runner, data writers, the conversations the tiny model
memorises and the recipe that trains it. Fixtures live in conftest.py."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from ftkit.inference.generate import generate
from ftkit.inference.options import GenerationOptions

ROOT = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def ftkit(*args: str, cwd: Path = ROOT, env: dict | None = None, unset: tuple = (),
          stdin: bytes | None = None) -> subprocess.CompletedProcess:
    """Run the real console entry point, as a user would; `stdin` is piped in as raw bytes."""
    environment = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in unset}
    result = subprocess.run([sys.executable, "-m", "ftkit", *args], cwd=cwd, capture_output=True, input=stdin,
                            env=environment, timeout=600)
    result.stdout, result.stderr = (text_of(out) for out in (result.stdout, result.stderr))
    return result


def text_of(output: bytes) -> str:
    """As subprocess's text mode reads it (universal newlines), with a bad byte shown as U+FFFD."""
    return output.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    """The CLI in this process (no interpreter start-up): (exit status, stdout, stderr)."""
    from ftkit.cli import main

    try:
        main(args)
        code = 0
    except SystemExit as done:
        code = done.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


SYSTEM = "Answer from memory."
CHATS = [
    ("What is the capital of Ftkitland?", "The capital of Ftkitland is Tinyville."),
    ("How many moons does Zorb have?", "Zorb has three moons: Pim, Pom and Pum."),
    ("Which animal guards Byte Island?", "A sleepy orange cat guards Byte Island."),
    ("請續寫：床前明月光，", "疑是地上霜。舉頭望明月，低頭思故鄉。"),
    ("佐布星有幾個月亮？", "佐布星有三個月亮。"),
    ("你食咗飯未呀？", "食咗喇，唔該晒！"),
]
MULTI_TURN = [("Tell me about Zorb.", "Zorb is a small planet with a green sky."),
              ("And its moons?", "Its three moons are Pim, Pom and Pum.")]
GREEDY = GenerationOptions(max_new_tokens=200, greedy=True)


def rows() -> list[dict]:
    out = [{"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q},
                         {"role": "assistant", "content": a}]} for q, a in CHATS]
    turns = [{"role": "system", "content": SYSTEM}]
    for q, a in MULTI_TURN:
        turns += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return out + [{"messages": turns}]


def make_recipe(tmp_path: Path, tiny_model: Path, name: str, **overrides) -> Path:
    data = write_jsonl(tmp_path / "chats.jsonl", rows())
    recipe = {
        "model_name_or_path": str(tiny_model), "use_peft": True, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
        "lora_modules_to_save": ["embed_tokens", "lm_head"], "dataset_mixer": {str(data): 1.0},
        "output_dir": str(tmp_path / name), "max_steps": 150, "per_device_train_batch_size": 7,
        "learning_rate": 1e-2, "lr_scheduler_type": "constant", "gradient_checkpointing": False,
        "logging_steps": 10, "save_strategy": "no", "seed": 0, "hub_token": "hf_do_not_save_me", **overrides,
    }
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    return path


def assert_memorised(model, chat_format) -> None:
    for question, answer in CHATS:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        assert generate(model, chat_format, messages, GREEDY) == answer
    history = [{"role": "system", "content": SYSTEM}]
    for question, answer in MULTI_TURN:
        history.append({"role": "user", "content": question})
        assert generate(model, chat_format, history, GREEDY) == answer
        history.append({"role": "assistant", "content": answer})




# Agent traces and reasoning, as people bring them: OpenAI exports (arguments as JSON text, tool results as JSON),
# Hugging Face messages (arguments as objects), reasoning_content. The tiny model memorises them per family.
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
MOONS = {"type": "function", "function": {"name": "get_moons", "description": "The moons of a planet",
         "parameters": {"type": "object", "properties": {"planet": {"type": "string"}}, "required": ["planet"]}}}
TOOLS = [WEATHER, MOONS]
# (question, tool, arguments, tool result, final answer)
TOOL_CHATS = [("What is the weather in Tinyville?", "get_weather", {"city": "Tinyville"}, "sunny, 21 C",
               "It is sunny and 21 C in Tinyville."),
              ("Look up the moons of Zorb.", "get_moons", {"planet": "Zorb"}, '["Pim", "Pom", "Pum"]',
               "Zorb has three moons: Pim, Pom and Pum.")]
# turns of (question, reasoning, answer)
REASONING_CHATS = [[("How many moons does Zorb have?", "Zorb's moons are Pim, Pom and Pum.", "Three.")],
                   [("Tell me about Ftkitland.", "Recall its capital.", "Its capital is Tinyville."),
                    ("And which animal lives there?", "The cat of Byte Island.", "A sleepy orange cat.")]]


def tool_call(name: str, arguments, call_id: str | None = None) -> dict:
    call = {"type": "function", "function": {"name": name, "arguments": arguments}}
    return {**call, "id": call_id} if call_id else call


def agent_rows() -> list[dict]:
    """The tool chats in OpenAI's export form (the first with arguments as JSON text) and the reasoning chats."""
    rows = []
    for k, (question, name, arguments, result, final) in enumerate(TOOL_CHATS):
        args = json.dumps(arguments) if k == 0 else arguments
        rows.append({"messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": None, "tool_calls": [tool_call(name, args, f"call_{k}")]},
            {"role": "tool", "tool_call_id": f"call_{k}", "content": json.loads(result) if k else result},
            {"role": "assistant", "content": final}], "tools": TOOLS})
    for chat in REASONING_CHATS:
        messages = []
        for question, reasoning, answer in chat:
            messages += [{"role": "user", "content": question},
                         {"role": "assistant", "reasoning_content": reasoning, "content": answer}]
        rows.append({"messages": messages})
    return rows


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: equal snapshots mean nothing was changed, added or removed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(\d+)s$")


def chart_lines(path: Path) -> dict[str, list[tuple[float, float]]]:
    """The polylines of an SVG chart ftkit wrote (train/chart.py), by their legend label, in drawing order."""
    import xml.etree.ElementTree as ET

    svg = ET.parse(path).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    lines = [[tuple(map(float, pair.split(","))) for pair in line.get("points").split()]
             for line in svg.iter(f"{ns}polyline")]
    labels = [text.text for text in svg.iter(f"{ns}text") if text.get("text-anchor") is None]
    return dict(zip(labels, lines))


def loss_curve_points(path: Path) -> list[tuple[float, float]]:
    """The train-loss line of a run's loss_curve.svg, in SVG coordinates."""
    return chart_lines(path)["train loss"]


def parse_step_line(line: str) -> dict[str, float]:
    """A plain step line (`step 120/400 epoch 1.5 loss 0.532 lr 2.0e-4 ... eta 1m02s`) -> {name: number}; fails
    on anything else. Durations become seconds; every other value must be what float() reads."""
    head, _, rest = line.partition(" ")
    step, _, total = rest.split(" ", 1)[0].partition("/")
    assert head == "step" and step.isdigit() and total.isdigit(), line
    words = rest.split(" ")[1:]
    assert len(words) % 2 == 0, line
    values: dict[str, float] = {"step": int(step), "total": int(total)}
    for name, text in zip(words[::2], words[1::2]):
        duration = DURATION.match(text)
        if name in ("elapsed", "eta"):
            assert duration, line
            hours, minutes, seconds = (int(g or 0) for g in duration.groups())
            values[name] = 3600 * hours + 60 * minutes + seconds
        else:
            values[name] = float(text)
    return values


# Preference data: for each of CHATS a shorter answer the SFT run never saw (chosen) against the one it learned
# (rejected). No chosen answer starts with the rejected one's first token, so KTO can tell them apart early.
SHORT_ANSWERS = ["Its capital is Tinyville.", "Three: Pim, Pom, Pum.", "An orange cat.", "疑是地上霜。", "三個。", "食咗喇！"]


def preference_rows() -> list[dict]:
    return [{"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
             "chosen": [{"role": "assistant", "content": short}], "rejected": [{"role": "assistant", "content": a}]}
            for (q, a), short in zip(CHATS, SHORT_ANSWERS)]


def preference_recipe(tmp_path: Path, start: Path, name: str, method: str, rows: list[dict] | None = None,
                      **overrides) -> Path:
    data = write_jsonl(tmp_path / f"{name}.jsonl", rows if rows is not None else preference_rows())
    recipe = {
        "model_name_or_path": str(start), "method": method, "use_peft": True, "lora_r": 8, "lora_alpha": 16,
        "lora_dropout": 0.0, "lora_modules_to_save": ["embed_tokens", "lm_head"], "dataset_mixer": {str(data): 1.0},
        "output_dir": str(tmp_path / name), "max_steps": 100, "per_device_train_batch_size": 6,
        "learning_rate": 1e-2, "lr_scheduler_type": "constant", "gradient_checkpointing": False, "logging_steps": 10,
        "save_strategy": "no", "seed": 0, **overrides,
    }
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    return path


def assert_gives_chosen(model, chat_format) -> None:
    """Greedy answers are exactly the chosen (short) answers, each stopping at the end-of-turn token."""
    for (question, _), short in zip(CHATS, SHORT_ANSWERS):
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        assert generate(model, chat_format, messages, GREEDY) == short


def trained_runs(input_ids: list[int], labels: list[int]) -> list[list[int]]:
    """The runs of consecutive trained tokens in a sample (each label equal to its input id)."""
    runs, current = [], []
    for tok, label in zip(input_ids, labels):
        if label != -100:
            assert label == tok
            current.append(tok)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


# Tool-call syntaxes read off the template (data/call_syntax.py): TRL's copies of templates whose calls carry JSON
# arguments in a layout of their own, and a Mistral-like one written here (JSON around the name and arguments).
TRL_TEMPLATES = Path(importlib.util.find_spec("trl").submodule_search_locations[0]) / "chat_templates"
MISTRAL_LIKE = (
    "{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content }}[/INST]{% elif m.role == 'assistant' %}"
    "{{ m.content }}{% if m.tool_calls %}[TOOL_CALLS][{% for c in m.tool_calls %}{\"name\": \"{{ c.function.name }}\", "
    "\"arguments\": {{ c.function.arguments | tojson }}}{% if not loop.last %}, {% endif %}{% endfor %}]{% endif %}"
    "</s>{% elif m.role == 'tool' %}[TOOL_RESULTS]{{ m.content }}[/TOOL_RESULTS]{% endif %}{% endfor %}")
# (name, arguments) of the calls one assistant turn makes: nested objects and lists in the arguments
CALLS = [("get_weather", {"city": "Tinyville", "when": {"day": "today", "hours": [9, 12]}}),
         ("get_moons", {"planet": "Zorb"})]


def template_text(name: str) -> str:
    return MISTRAL_LIKE if name == "mistral-like" else (TRL_TEMPLATES / name).read_text()


def as_generated(chat_format, messages: list[dict], tools: list | None = None) -> str:
    """The last turn as a model writes it after the prompt for it, up to where generation stops."""
    from ftkit.data.template_features import generated

    text = generated(chat_format.render(messages, tools=tools), chat_format.prompt(messages[:-1], tools))
    ends = [text.find(stop) for stop in chat_format.stop_strings() if stop in text]
    return text[:min(ends)] if ends else text
