"""Today's chat data (issue 18): tool calls and tool results in every dialect people export, reasoning, multi-part
content and chat_template_kwargs, through real families' templates (TRL's copies of Qwen3, Llama-3.1, Qwen2.5).

Masks are asserted token by token; the slow tests train the tiny model on tool-calling and reasoning conversations
per family and check, with plain transformers on the merged model and the template's own
`apply_chat_template(..., tools=...)`, that it writes exactly the trained tool call, then exactly the trained answer
after the tool result, then stops."""

from __future__ import annotations

import json

import pytest

from ftkit.config.arguments import ModelArguments
from ftkit.data.formats import BadRow, detect_format, to_internal
from ftkit.errors import FtkitError
from ftkit.train.model import load_tokenizer
from tests.helpers import (CALLS, MOONS, REASONING_CHATS, TOOL_CHATS, TOOLS, WEATHER, agent_rows, as_generated, cli,
                           ftkit, make_recipe, template_text, tool_call, trained_runs, write_jsonl)

FAMILIES = ("qwen3", "llama3_1", "qwen2_5")
QUIET = {"log": lambda *_: None}
CALL = {"role": "assistant", "content": "", "tool_calls": [tool_call("get_weather", {"city": "Tinyville"})]}
USER = {"role": "user", "content": "What is the weather in Tinyville?"}


def internal(row: dict) -> dict:
    return to_internal(row, detect_format(list(row)), None)


def family_format(family_model, family: str, **kwargs):
    tokenizer, chat_format, added = load_tokenizer(ModelArguments(model_name_or_path=str(family_model(family))), None,
                                                   template_kwargs=kwargs or None, **QUIET)
    return tokenizer, chat_format


# --- every dialect becomes one form ------------------------------------------------------------------------------

OPENAI = {"messages": [USER, {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Tinyville"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}],
    "tools": TOOLS}
ONE_FORM = [USER, {"role": "assistant", "content": "", "tool_calls": [tool_call("get_weather", {"city": "Tinyville"},
                                                                                  "call_1")]},
            {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}, {"role": "assistant", "content": "Sunny."}]


@pytest.mark.parametrize("row", [
    OPENAI,  # OpenAI's API and fine-tuning exports: arguments as JSON text
    {**OPENAI, "messages": [USER, {"role": "assistant", "tool_calls": [  # Hugging Face: arguments as an object
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Tinyville"}}}]},
        *OPENAI["messages"][2:]]},
    {**OPENAI, "tools": json.dumps([WEATHER["function"], MOONS["function"]])},  # bare schemas, as JSON text
    {"messages": [USER, {"role": "assistant", "content": None, "function_call": {  # OpenAI's legacy form
        "name": "get_weather", "arguments": '{"city": "Tinyville"}'}}, {"role": "function", "name": "get_weather",
        "content": "sunny"}, {"role": "assistant", "content": "Sunny."}], "functions": [WEATHER["function"],
                                                                                     MOONS["function"]]},
])
def test_tool_calling_dialects_become_one_form(row):
    got = internal(row)
    assert got["tools"] == TOOLS
    expected = ONE_FORM if "functions" not in row else [
        ONE_FORM[0], {**ONE_FORM[1], "tool_calls": [tool_call("get_weather", {"city": "Tinyville"})]},
        {"role": "tool", "content": "sunny", "name": "get_weather"}, ONE_FORM[3]]
    assert got["messages"] == expected


def test_llama_factory_sharegpt_function_calling():
    """LLaMA-Factory's form: function_call / observation turns, tools as a JSON string column, a system column."""
    row = {"conversations": [{"from": "human", "value": USER["content"]},
                             {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": '
                                                                '"Tinyville"}}'},
                             {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "Sunny."}],
           "system": "Use tools.", "tools": json.dumps([WEATHER["function"]])}
    got = internal(row)
    assert got["tools"] == [WEATHER]
    assert got["messages"] == [{"role": "system", "content": "Use tools."}, USER,
                               {"role": "assistant", "content": "", "tool_calls": [tool_call("get_weather", {
                                   "city": "Tinyville"})]}, {"role": "tool", "content": "sunny"},
                               {"role": "assistant", "content": "Sunny."}]


def test_reasoning_fields_multi_part_text_weights_and_row_kwargs():
    row = {"messages": [{"role": "developer", "content": [{"type": "text", "text": "Be"}, {"type": "text",
                                                                                            "text": "brief."}]},
                        {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
                        {"role": "assistant", "thinking": "greet", "content": "Hello.", "weight": 0},
                        {"role": "user", "content": "Again"},
                        {"role": "assistant", "reasoning": "again", "content": "Hello!", "weight": 1}],
           "chat_template_kwargs": '{"enable_thinking": true}'}
    got = internal(row)
    assert got["messages"] == [{"role": "system", "content": "Be\nbrief."}, {"role": "user", "content": "Hi"},
                               {"role": "assistant", "content": "Hello.", "reasoning_content": "greet", "weight": 0},
                               {"role": "user", "content": "Again"},
                               {"role": "assistant", "content": "Hello!", "reasoning_content": "again"}]
    assert got["chat_template_kwargs"] == {"enable_thinking": True}


@pytest.mark.parametrize("messages, extra, message", [
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}, {"role": "assistant",
      "content": "a"}], {}, "turn 1: a content part of type 'image_url' is not text; ftkit trains text-only models "
     "(images, audio and files are not supported yet)"),
    ([USER, {"role": "assistant", "tool_calls": [tool_call("f", "{not json")]}], {},
     "turn 2: the arguments of tool call 'f' are not valid JSON"),
    ([USER, {"role": "assistant", "tool_calls": [tool_call("f", "[1]")]}], {},
     "turn 2: the arguments of tool call 'f' must be a JSON object, got list"),
    ([USER, {"role": "assistant", "tool_calls": [{"type": "function", "function": {"arguments": "{}"}}]}], {},
     "turn 2: each tool call needs a function name: {type: function, function: {name, arguments}}"),
    ([USER, {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "a"}], {},
     "turn 2: a tool result must follow an assistant turn that calls a tool"),
    ([USER, {"role": "assistant", "content": ""}], {}, "turn 2: empty assistant turn"),
    ([USER, {"role": "assistant", "content": "a"}], {"tools": "{bad"}, "'tools' is not valid JSON"),
    ([USER, {"role": "assistant", "content": "a"}], {"tools": [{"description": "no name"}]},
     "'tools': each tool needs a name (a function schema {name, description, parameters})"),
    ([USER, {"role": "assistant", "content": "a"}], {"tools": [{"name": "f", "parameters": "[1]"}]},
     "'tools': the parameters of tool 'f' must be a JSON schema object, got list"),
    ([USER, {"role": "assistant", "content": "a"}], {"tools": [{"name": "f", "parameters": "{bad"}]},
     "'tools': the parameters of tool 'f' is not valid JSON"),
    ([USER, {"role": "assistant", "content": "a"}], {"chat_template_kwargs": {"tools": []}},
     "'chat_template_kwargs' may not set tools: ftkit passes it to the template itself"),
    ([USER, {"role": "assistant", "content": "a", "weight": 2}], {},
     "turn 2: 'weight' must be 0 (not trained) or 1, got 2"),
])
def test_bad_agent_rows_say_why(messages, extra, message):
    with pytest.raises(BadRow) as err:
        internal({"messages": messages, **extra})
    assert str(err.value) == message


# --- masks, token by token, on real templates --------------------------------------------------------------------

def test_qwen3_multi_turn_reasoning_masks_token_by_token(family_model):
    """Qwen3 drops an earlier turn's <think> block once a later user turn follows, so each assistant turn is its own
    sample, ending with that turn as it is rendered when generated; only that turn's tokens carry loss."""
    tokenizer, chat_format = family_format(family_model, "qwen3")
    [(q1, r1, a1), (q2, r2, a2)] = REASONING_CHATS[1]
    row = internal({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q1},
                                 {"role": "assistant", "reasoning_content": r1, "content": a1},
                                 {"role": "user", "content": q2},
                                 {"role": "assistant", "reasoning_content": r2, "content": a2}]})
    first, second = chat_format.encode(row["messages"])
    head = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n" + q1 + "<|im_end|>\n<|im_start|>assistant\n"
    turn1 = f"<think>\n{r1}\n</think>\n\n{a1}<|im_end|>"
    assert tokenizer.decode(first.input_ids) == head + turn1 + "\n"
    assert first.input_ids == tokenizer.encode(head + turn1 + "\n", add_special_tokens=False)
    assert trained_runs(first.input_ids, first.labels) == [tokenizer.encode(turn1, add_special_tokens=False)]
    history = head + a1 + "<|im_end|>\n<|im_start|>user\n" + q2 + "<|im_end|>\n<|im_start|>assistant\n"
    turn2 = f"<think>\n{r2}\n</think>\n\n{a2}<|im_end|>"
    assert second.input_ids == tokenizer.encode(history + turn2 + "\n", add_special_tokens=False)
    labels = [-100] * len(tokenizer.encode(history, add_special_tokens=False))
    labels += tokenizer.encode(turn2, add_special_tokens=False) + [-100]
    assert second.labels == labels
    # the same turns through plain transformers: each sample is the template's own rendering of its prefix
    plain = tokenizer.apply_chat_template(row["messages"][:3], tokenize=False)
    assert tokenizer.decode(first.input_ids) == plain


def test_qwen3_tool_calling_masks_token_by_token(family_model):
    """Tool calls train as `<think>\\n\\n</think>\\n\\n<tool_call>...` with their end of turn; the tool schemas, the
    system block and the tool result never carry loss."""
    tokenizer, chat_format = family_format(family_model, "qwen3")
    row = internal(agent_rows()[0])
    samples = chat_format.samples(row["messages"], "assistant", row["tools"])
    encoded = chat_format.encode_texts(samples)
    call = ('<think>\n\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Tinyville"}}\n'
            '</tool_call><|im_end|>')
    final = "<think>\n\n</think>\n\nIt is sunny and 21 C in Tinyville.<|im_end|>"
    assert [trained_runs(e.input_ids, e.labels) for e in encoded] == [
        [tokenizer.encode(call, add_special_tokens=False)], [tokenizer.encode(final, add_special_tokens=False)]]
    plain = [{"role": "user", "content": TOOL_CHATS[0][0]}, {"role": "assistant", "tool_calls": [
        tool_call("get_weather", {"city": "Tinyville"})]}, {"role": "tool", "content": "sunny, 21 C"},
        {"role": "assistant", "content": TOOL_CHATS[0][4]}]
    assert samples[0][0] == tokenizer.apply_chat_template(plain[:2], tools=TOOLS, tokenize=False)
    assert samples[1][0] == tokenizer.apply_chat_template(plain, tools=TOOLS, tokenize=False)
    assert "<tools>" in samples[0][0][:samples[0][1][0][0]]  # the schemas are in the prompt, masked


@pytest.mark.parametrize("family, calls", [
    ("llama3_1", ['{"name": "get_weather", "parameters": {"city": "Tinyville"}}<|eot_id|>']),
    ("qwen2_5", ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Tinyville"}}\n</tool_call><|im_end|>']),
])
def test_templates_that_keep_prefixes_train_a_tool_conversation_as_one_sample(family_model, family, calls):
    """OpenAI's JSON-text arguments reach Llama-3.1's and Qwen2.5's templates as the objects they `tojson`, so the
    rendering is the template's own for object arguments (a string would render quoted)."""
    tokenizer, chat_format = family_format(family_model, family)
    row = internal(agent_rows()[0])
    [(text, spans)] = chat_format.samples(row["messages"], "assistant", row["tools"])
    [encoded] = chat_format.encode_texts([(text, spans)])
    final = TOOL_CHATS[0][4] + chat_format.end_of_turn
    assert trained_runs(encoded.input_ids, encoded.labels) == [
        tokenizer.encode(t, add_special_tokens=False) for t in calls + [final]]
    plain = [{"role": "user", "content": TOOL_CHATS[0][0]}, {"role": "assistant", "tool_calls": [
        tool_call("get_weather", {"city": "Tinyville"})]}, {"role": "tool", "content": "sunny, 21 C"},
        {"role": "assistant", "content": TOOL_CHATS[0][4]}]
    assert text == tokenizer.apply_chat_template(plain, tools=TOOLS, tokenize=False)


def test_a_template_that_renders_arguments_as_given_gets_json_text(family_model):
    tokenizer, _ = family_format(family_model, "qwen2_5")
    from ftkit.data.chat_format import ChatFormat

    raw = ("{% for m in messages %}{{ m.role }}: {{ m.content }}{% for c in m.tool_calls or [] %}CALL "
           "{{ c.function.name }} {{ c.function.arguments }}{% endfor %}<|im_end|>\n{% endfor %}"
           "{% if add_generation_prompt %}assistant: {% endif %}")
    chat_format = ChatFormat(tokenizer, raw)
    assert chat_format.features.arguments == "string"
    assert 'CALL get_weather {"city": "Tinyville"}' in chat_format.render([USER, CALL])


def test_chat_template_kwargs_reach_every_rendering(family_model):
    """enable_thinking: false puts Qwen3's empty think block in the prompt, so it is not trained; a row's own
    chat_template_kwargs win over the recipe's."""
    tokenizer, chat_format = family_format(family_model, "qwen3", enable_thinking=False)
    messages = [USER, {"role": "assistant", "content": "Sunny."}]
    assert chat_format.prompt(messages[:1]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    [encoded] = chat_format.encode(messages)
    assert trained_runs(encoded.input_ids, encoded.labels) == [tokenizer.encode("Sunny.<|im_end|>",
                                                                                add_special_tokens=False)]
    assert chat_format.prompt(messages[:1], kwargs={"enable_thinking": True}).endswith("<|im_start|>assistant\n")
    assert chat_format.answer(messages, kwargs={"enable_thinking": True}) == "<think>\n\n</think>\n\nSunny."
    # a hub dataset's column (smoltalk2): Arrow fills keys other rows have with null, which means "not set"
    row = internal({"messages": messages, "chat_template_kwargs": {"enable_thinking": True, "xml_tools": None}})
    assert row["chat_template_kwargs"] == {"enable_thinking": True}
    [(text, [span])] = chat_format.samples(row["messages"], "assistant", kwargs=row["chat_template_kwargs"])
    assert text[span[0]:span[1]] == "<think>\n\n</think>\n\nSunny.<|im_end|>"


def test_a_turn_with_weight_0_carries_no_loss(tiny_model):
    tokenizer, chat_format, _ = load_tokenizer(ModelArguments(model_name_or_path=str(tiny_model)), "chatml", **QUIET)
    row = internal({"messages": [USER, {"role": "assistant", "content": "Rainy.", "weight": 0},
                                 {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Sunny."}]})
    [encoded] = chat_format.encode(row["messages"])
    assert trained_runs(encoded.input_ids, encoded.labels) == [tokenizer.encode("Sunny.<|im_end|>",
                                                                                add_special_tokens=False)]
    assert "Rainy." in tokenizer.decode(encoded.input_ids)


# --- refusals: one line naming the template and the turn ---------------------------------------------------------

def test_a_template_that_raises_on_a_row_is_one_line_naming_it(family_model, tmp_path, capsys):
    """Llama-3.1's template refuses parallel tool calls with raise_exception."""
    two = {"role": "assistant", "tool_calls": [tool_call("get_weather", {"city": "A"}),
                                               tool_call("get_weather", {"city": "B"})]}
    line = preview_error(tmp_path, family_model("llama3_1"), [{"messages": [USER, two], "tools": TOOLS}], capsys)
    assert line == (f"ftkit: error: source '{tmp_path / 'agent.jsonl'}', row 1: the chat template of "
                    f"'{family_model('llama3_1')}' cannot render this conversation: TemplateError: This model only "
                    "supports single tool-calls at once!")


def preview_error(tmp_path, model, rows, capsys, **overrides) -> str:
    data = write_jsonl(tmp_path / "agent.jsonl", rows)
    recipe = make_recipe(tmp_path, model, "p", dataset_mixer={str(data): 1.0}, **overrides)
    code, _, err = cli(["preview", str(recipe), "--json", "--no-cache"], capsys)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("ftkit:")]
    assert len(lines) == 1, err
    return lines[0]


def test_a_template_that_would_drop_tools_or_tool_calls_is_refused(tiny_model, tmp_path, capsys):
    assert preview_error(tmp_path, tiny_model, agent_rows()[:1], capsys) == (
        f"ftkit: error: source '{tmp_path / 'agent.jsonl'}', row 1: the chat template of '{tiny_model}' does not "
        "show `tools` (function schemas) to the model; use the model's own chat template or one that renders them "
        "(e.g. TRL's qwen3, qwen2_5 or llama3_1 templates)")
    row = {"messages": agent_rows()[0]["messages"]}
    assert preview_error(tmp_path, tiny_model, [row], capsys, chat_template="chatml").endswith(
        "row 1: the built-in chat template 'chatml' does not render tool calls (turn 2 has tool_calls); use the "
        "model's own chat template or one that renders them (e.g. TRL's qwen3, qwen2_5 or llama3_1 templates)")


def test_a_turn_the_template_cannot_align_is_refused_naming_template_and_turn(family_model, tmp_path, capsys):
    """Reasoning with enable_thinking: false: Qwen3's prompt ends with an empty think block, the turn has a full one."""
    line = preview_error(tmp_path, family_model("qwen3"), agent_rows()[2:3], capsys,
                         chat_template_kwargs={"enable_thinking": False})
    assert line == (f"ftkit: error: source '{tmp_path / 'agent.jsonl'}', row 1: the chat template of "
                    f"'{family_model('qwen3')}' renders assistant turn 2 differently from the prompt it gives for "
                    "generating it (the prompt continues '\\n</think>\\n\\n', the turn \"Zorb's moons are Pim, Pom "
                    "and \"), so its answer cannot be located; fix that turn (e.g. reasoning with enable_thinking: "
                    "false) or use another chat_template")


@pytest.mark.parametrize("kwargs, problem", [
    ("{1: true}", "must be a mapping of template variables, e.g. {enable_thinking: false}"),
    ("{add_generation_prompt: true}", "may not set add_generation_prompt: ftkit passes it to the template itself"),
])
def test_recipe_chat_template_kwargs_are_checked(tiny_model, tmp_path, kwargs, problem, capsys):
    recipe = make_recipe(tmp_path, tiny_model, "r")
    recipe.write_text(recipe.read_text() + f"chat_template_kwargs: {kwargs}\n")
    code, _, err = cli(["validate", str(recipe)], capsys)
    assert code == 2 and f"'chat_template_kwargs': {problem}" in err, err


# --- preview and statistics --------------------------------------------------------------------------------------

def test_preview_says_how_conversations_are_trained(family_model, tmp_path, capsys):
    data = write_jsonl(tmp_path / "agent.jsonl", agent_rows())
    recipe = make_recipe(tmp_path, family_model("qwen3"), "p", dataset_mixer={str(data): 1.0})
    code, out, err = cli(["preview", str(recipe), "-n", "1"], capsys)
    assert code == 0, err
    assert ("1 training rows trained as one sample each; 3 as one sample per assistant turn, because the chat "
            "template renders earlier assistant turns differently once later messages follow") in " ".join(out.split())
    code, out, _ = cli(["preview", str(recipe), "--json"], capsys)
    stats = json.loads(out)
    assert (stats["conversations"], stats["split_conversations"], stats["train_samples"]) == (4, 3, 7)
    assert stats["unrendered_turns"] == 0


def test_preview_counts_turns_whose_text_the_template_leaves_out(family_model, tmp_path, capsys):
    """Llama-3.1's template renders only the call of an assistant turn that also has text."""
    chatty = {"messages": [USER, {**CALL, "content": "Let me look."}, {"role": "tool", "content": "sunny"},
                           {"role": "assistant", "content": "Sunny."}], "tools": TOOLS}
    data = write_jsonl(tmp_path / "agent.jsonl", [chatty, *agent_rows()])
    recipe = make_recipe(tmp_path, family_model("llama3_1"), "p", dataset_mixer={str(data): 1.0})
    code, out, err = cli(["preview", str(recipe), "-n", "0"], capsys)
    assert code == 0, err
    assert ("5 training rows, each trained as one sample; note: in 1 assistant turns the chat template leaves out "
            "text or reasoning the data has") in " ".join(out.split())


def test_eval_rows_are_counted_apart_from_training_tokens(tiny_model, tmp_path):
    from ftkit.config.recipe import load_recipe
    from ftkit.data.pipeline import build_datasets

    recipe = load_recipe(make_recipe(tmp_path, tiny_model, "r", test_split_size=2))
    _, chat_format, _ = load_tokenizer(recipe.model, None, **QUIET)
    data = build_datasets(recipe, chat_format, use_cache=False, **QUIET)
    assert data.stats.tokens == sum(len(ids) for ids in data.train["input_ids"])
    assert data.stats.eval_tokens == sum(len(ids) for ids in data.eval["input_ids"]) > 0
    assert data.stats.trained_tokens == sum(sum(1 for x in row if x != -100) for row in data.train["labels"])
    assert data.stats.eval_trained_tokens == sum(sum(1 for x in row if x != -100) for row in data.eval["labels"])


def test_streaming_gives_the_samples_the_cached_pipeline_gives(family_model, tmp_path):
    """Tool rows and split conversations through `streaming: true` (rows read lazily) as through the token cache."""
    from ftkit.config.recipe import load_recipe
    from ftkit.data.pipeline import build_datasets

    data = write_jsonl(tmp_path / "agent.jsonl", agent_rows())
    recipe = load_recipe(make_recipe(tmp_path, family_model("qwen3"), "r", dataset_mixer={str(data): 1.0}))
    _, chat_format, _ = load_tokenizer(recipe.model, None, **QUIET)
    cached = build_datasets(recipe, chat_format, use_cache=False, **QUIET).train
    recipe.data.streaming = True
    streamed = build_datasets(recipe, chat_format, **QUIET).train
    seen = {json.dumps([row["input_ids"], row["labels"]]) for row in streamed.take(30)}
    assert seen == {json.dumps([row["input_ids"], row["labels"]]) for row in cached} and len(seen) == 7


def test_text_only_data_previews(tiny_model, tmp_path, capsys):
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": "The river flows to the sea."}, {"text": "床前明月光。"}])
    code, out, err = cli(["preview", str(make_recipe(tmp_path, tiny_model, "t", dataset_mixer={str(data): 1.0})),
                          "--json"], capsys)
    assert code == 0, err
    stats = json.loads(out)
    assert stats["train_samples"] == 2 and stats["trained_tokens"] == stats["tokens"] > 0


def test_serve_reads_requests_as_training_data_and_refuses_what_it_cannot_render(family_model):
    """400s in OpenAI's error shape, before any generation: an image part, arguments that are not JSON, tools that are
    not schemas, a template variable ftkit sets itself, a template that raises."""
    from fastapi.testclient import TestClient
    from transformers import AutoTokenizer

    from ftkit.commands.serve import Engine, create_app
    from ftkit.data.chat_format import ChatFormat
    from ftkit.inference.options import GenerationOptions

    tokenizer = AutoTokenizer.from_pretrained(family_model("llama3_1"))
    engine = Engine(None, ChatFormat(tokenizer, tokenizer.chat_template, name="llama3_1"), "m", GenerationOptions())
    client = TestClient(create_app(engine))
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}
    bad_args = {"role": "assistant", "tool_calls": [tool_call("get_weather", "{city")]}
    two = {"role": "assistant", "tool_calls": [tool_call("get_weather", {"city": "A"}), tool_call("get_weather", {})]}
    cases = [({"messages": [image]}, "messages", "messages: turn 1: a content part of type 'image_url' is not text"),
             ({"messages": [USER, bad_args, {"role": "tool", "content": "x"}]}, "messages",
              "messages: turn 2: the arguments of tool call 'get_weather' are not valid JSON"),
             ({"messages": [USER], "tools": [{"description": "x"}]}, "tools", "tools: each tool needs a name"),
             ({"messages": [USER], "chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs",
              "chat_template_kwargs may not set add_generation_prompt"),
             ({"messages": [USER, two, {"role": "tool", "content": "x"}]}, "messages",
              "llama3_1 cannot render this conversation: TemplateError: This model only supports single tool-calls")]
    for body, param, message in cases:
        response = client.post("/v1/chat/completions", json=body)
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] == param and error["message"].startswith(message), error


def test_tool_files_and_template_kwargs_on_the_command_line_are_checked(tmp_path):
    from ftkit.inference.loading import parse_template_kwargs, read_tools

    (tmp_path / "tools.json").write_text(json.dumps([WEATHER["function"]]))
    assert read_tools(tmp_path / "tools.json") == [WEATHER]
    (tmp_path / "empty.json").write_text("[]")
    (tmp_path / "folder").mkdir()
    for name, message in (("missing.json", "no such file"), ("empty.json", "holds no function schemas"),
                          ("folder", "a directory; give a JSON file with a list of function schemas")):
        with pytest.raises(FtkitError, match=message):
            read_tools(tmp_path / name)
    assert parse_template_kwargs('{"enable_thinking": false}') == {"enable_thinking": False}
    with pytest.raises(FtkitError, match="not JSON"):
        parse_template_kwargs("enable_thinking=false")


def test_source_tools_apply_to_rows_without_their_own(tmp_path):
    from ftkit.config.sources import SourcesError, mixture_entry
    from ftkit.data.loading import load_mixture

    (tmp_path / "tools.json").write_text(json.dumps([WEATHER]))
    rows = [{"messages": [USER, {"role": "assistant", "content": "a"}]},
            {"messages": [USER, {"role": "assistant", "content": "b"}], "tools": [MOONS]}]
    write_jsonl(tmp_path / "d.jsonl", rows)
    spec = mixture_entry({"id": str(tmp_path / "d.jsonl"), "tools": str(tmp_path / "tools.json")}, 0)
    train, _, _ = load_mixture([spec], None, "error", 0, None)
    assert sorted(json.dumps(r["tools"]) for r in train) == sorted([json.dumps([WEATHER]), json.dumps([MOONS])])
    with pytest.raises(SourcesError, match="entry 1: 'tools' file 'nope.json' cannot be read"):
        mixture_entry({"id": "x", "tools": "nope.json"}, 0)


# --- trained: the tiny model memorises tool calling and reasoning per family -------------------------------------

STEPS = 70
REASONING_FIELD = {"qwen3": True, "llama3_1": False, "qwen2_5": False}  # else ftkit writes <think> into the content


@pytest.fixture(scope="module")
def agent_run(family_model, tmp_path_factory):
    """family -> a LoRA run on agent_rows() (tool calls and reasoning), trained once per module; the recipe carries
    a GPU user's bf16: true, which trains in float32 here."""
    from ftkit.config.recipe import load_recipe
    from ftkit.train.run import run_training

    runs: dict = {}

    def get(family: str):
        if family not in runs:
            tmp = tmp_path_factory.mktemp(f"agent-{family}")
            data = write_jsonl(tmp / "agent.jsonl", agent_rows())
            recipe = make_recipe(tmp, family_model(family), "run", dataset_mixer={str(data): 1.0}, max_steps=STEPS,
                                 per_device_train_batch_size=8, bf16=True)
            lines: list[str] = []
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("FTKIT_CACHE", str(tmp / "cache"))
                runs[family] = (run_training(load_recipe(recipe), log=lines.append), lines)
        return runs[family]

    return get


def assert_generates(model, tokenizer, history: list[dict], turn: dict, tools: list | None = None) -> None:
    """Greedy generation continues the template's prompt with exactly `turn` as the template renders it, up to and
    including its end-of-turn token, and stops there."""
    import torch

    prompt = tokenizer.apply_chat_template(history, tools=tools, add_generation_prompt=True, tokenize=False)
    whole = tokenizer.apply_chat_template(history + [turn], tools=tools, tokenize=False)
    assert whole.startswith(prompt)
    expected = whole[len(prompt):].rstrip("\n")
    inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=80, do_sample=False)
    new = output[0, inputs["input_ids"].shape[1]:].tolist()
    assert tokenizer.decode(new) == expected
    assert len(new) < 80 and new[-1] in model.generation_config.eos_token_id


def reasoning_turn(family: str, reasoning: str, answer: str) -> dict:
    if REASONING_FIELD[family]:
        return {"role": "assistant", "reasoning_content": reasoning, "content": answer}
    return {"role": "assistant", "content": f"<think>\n{reasoning}\n</think>\n\n{answer}"}


@pytest.mark.slow
@pytest.mark.xdist_group("agent-runs")  # one worker trains each family once
@pytest.mark.parametrize("family", FAMILIES)
def test_merged_model_writes_the_trained_tool_call_then_the_answer_then_stops(agent_run, family, tmp_path):
    """Plain transformers on `ftkit merge`'s output, prompts from the template's own apply_chat_template(tools=...)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftkit.commands.merge import run_merge

    run, lines = agent_run(family)
    assert any("bf16: true, but this machine has no GPU: training in float32" in line for line in lines)
    merged = run_merge(run, tmp_path / "merged", **QUIET)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    for question, name, arguments, result, final in TOOL_CHATS:
        history = [{"role": "user", "content": question}]
        call = {"role": "assistant", "tool_calls": [tool_call(name, arguments)]}
        assert_generates(model, tokenizer, history, call, TOOLS)
        history += [call, {"role": "tool", "name": name, "content": result}]
        assert_generates(model, tokenizer, history, {"role": "assistant", "content": final}, TOOLS)
    for chat in REASONING_CHATS:
        history = []
        for question, reasoning, answer in chat:
            history.append({"role": "user", "content": question})
            turn = reasoning_turn(family, reasoning, answer)
            assert_generates(model, tokenizer, history, turn)
            history.append(turn)


@pytest.mark.slow
@pytest.mark.xdist_group("agent-runs")  # one worker trains each family once
def test_chat_with_tools_calls_the_tool_and_answers_its_result(agent_run, tmp_path):
    run, _ = agent_run("qwen3")
    (tmp_path / "tools.json").write_text(json.dumps(TOOLS))
    question, name, arguments, result, final = TOOL_CHATS[0]
    chat = ftkit("chat", "--adapter", str(run), "--tools", str(tmp_path / "tools.json"), "--greedy", "--no-stream",
                 stdin=f"{question}\n/tool {result}\n".encode())
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.splitlines() == ["<think>", "", "</think>", "", "<tool_call>",
                                        json.dumps({"name": name, "arguments": arguments}), "</tool_call>",
                                        "<think>", "", "</think>", "", final]
    assert f"(tool call {name}({json.dumps(arguments)}); answer it with /tool RESULT)" in chat.stderr


@pytest.mark.slow
@pytest.mark.xdist_group("agent-runs")  # one worker trains each family once
def test_predict_rows_with_tools_and_tool_results(agent_run, tmp_path):
    run, _ = agent_run("llama3_1")
    rows = agent_rows()
    asks = [{"messages": row["messages"][:2], "tools": TOOLS} for row in rows[:2]]  # reference: the tool call
    answers = [{"messages": row["messages"][:3], "tools": TOOLS} for row in rows[:2]]  # no reference: ends with a result
    source = write_jsonl(tmp_path / "rows.jsonl", asks + answers + rows[2:3])
    result = ftkit("predict", "--adapter", str(run), "--input", str(source), "--output", str(tmp_path / "out.jsonl"))
    assert result.returncode == 0, result.stderr
    assert "3 rows with references: exact match 1.000" in result.stdout
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r.get("tool_calls") for r in records[:2]] == [[{"name": n, "arguments": a}] for _, n, a, _, _ in TOOL_CHATS]
    assert [r["output"] for r in records[2:4]] == [chat[4] for chat in TOOL_CHATS]
    assert records[4]["output"] == "<think>\n{}\n</think>\n\n{}".format(*REASONING_CHATS[0][0][1:])


@pytest.mark.slow
@pytest.mark.xdist_group("agent-runs")  # one worker trains each family once
@pytest.mark.parametrize("family", ["qwen3", "llama3_1"])
def test_serve_returns_tool_calls_in_the_openai_shape(agent_run, family):
    from fastapi.testclient import TestClient

    from ftkit.commands.serve import Engine, create_app
    from ftkit.inference.loading import load_for_chat
    from ftkit.inference.options import GenerationOptions

    run, _ = agent_run(family)
    model, _, chat_format = load_for_chat(run, None, None, None)
    client = TestClient(create_app(Engine(model, chat_format, "agent", GenerationOptions(greedy=True))))
    question, name, arguments, result, final = TOOL_CHATS[1]
    ask = {"messages": [{"role": "user", "content": question}], "tools": TOOLS, "temperature": 0}
    choice = client.post("/v1/chat/completions", json=ask).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == name
    assert json.loads(call["function"]["arguments"]) == arguments  # OpenAI's form: JSON text
    follow = {**ask, "messages": [*ask["messages"], choice["message"],
                                  {"role": "tool", "tool_call_id": call["id"], "content": result}]}
    answer = client.post("/v1/chat/completions", json=follow).json()["choices"][0]
    assert answer["message"]["content"] == final and answer["finish_reason"] == "stop"
    streamed = client.post("/v1/chat/completions", json={**ask, "stream": True}).text
    chunks = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    [delta] = [c["choices"][0]["delta"] for c in chunks if c["choices"][0]["delta"].get("tool_calls")]
    assert delta["tool_calls"][0]["function"]["name"] == name and delta["tool_calls"][0]["index"] == 0


@pytest.mark.slow
@pytest.mark.xdist_group("agent-runs")  # one worker trains each family once
def test_text_only_data_trains_end_to_end(tiny_model, tmp_path):
    """Continued pre-training: rows of plain text, loss on every token, each ends with eos; the model continues a
    trained text's start exactly."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = ["The river flows to the sea, and the mountains stand in the morning light.", "床前明月光，疑是地上霜。"]
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in texts])
    recipe = make_recipe(tmp_path, tiny_model, "run", dataset_mixer={str(data): 1.0}, use_peft=False, max_steps=60,
                         learning_rate=5e-3, lora_modules_to_save=None)
    result = ftkit("train", str(recipe))
    assert result.returncode == 0, result.stderr
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run").eval()
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        with torch.no_grad():
            output = model.generate(torch.tensor([ids[:4]]), max_new_tokens=60, do_sample=False,
                                    eos_token_id=tokenizer.eos_token_id)
        assert output[0].tolist() == ids + [tokenizer.eos_token_id]


@pytest.mark.slow
@pytest.mark.xdist_group("agent-runs")  # one worker trains each family once
def test_chat_template_kwargs_are_recorded_and_used_by_chat_predict_and_merge(family_model, tmp_path):
    from ftkit import rundir
    from ftkit.commands.merge import run_merge
    from ftkit.inference.loading import load_for_chat

    recipe = make_recipe(tmp_path, family_model("qwen3"), "run", max_steps=2, chat_template_kwargs={
        "enable_thinking": False})
    assert ftkit("train", str(recipe)).returncode == 0
    run = tmp_path / "run"
    assert rundir.run_metadata(run)["chat_template_kwargs"] == {"enable_thinking": False}
    merged = run_merge(run, tmp_path / "merged", **QUIET)
    for source in ({"adapter": run, "model_dir": None}, {"adapter": None, "model_dir": merged}):
        _, _, chat_format = load_for_chat(source["adapter"], source["model_dir"], None, None)
        assert chat_format.prompt([USER]).endswith("<think>\n\n</think>\n\n")
    _, _, chat_format = load_for_chat(run, None, None, None, template_kwargs={"enable_thinking": True})
    assert chat_format.prompt([USER]).endswith("<|im_start|>assistant\n")
    assert '"enable_thinking": false' in (merged / "README.md").read_text()


# --- tool calls read back in the template's own syntax (data/call_syntax.py) ------------------------------------

def syntax_format(tiny_model, template: str, special: bool = False):
    """The tiny tokenizer with `template`; `special`: the template's special-looking strings are special tokens, as
    in the real model's tokenizer, so decoding drops them from what the model writes."""
    from transformers import AutoTokenizer

    from ftkit.data.chat_format import SPECIAL_LOOKING, ChatFormat

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    text = template_text(template)
    if special:
        tokenizer.add_tokens(sorted(set(SPECIAL_LOOKING.findall(text)) | {"[TOOL_CALLS]", "<｜tool▁sep｜>"}),
                             special_tokens=True)
    return tokenizer, ChatFormat(tokenizer, text, name=template)


def call_turn(calls, content: str = "Let me check.") -> list[dict]:
    return [USER, {"role": "assistant", "content": content,
                   "tool_calls": [tool_call(name, args, f"call_{i}") for i, (name, args) in enumerate(calls)]}]


# gpt-oss's template renders the first call of a turn only, and text beside a call in its analysis channel
SYNTAXES = [("gptoss.jinja", 1), ("deepseekv3.jinja", 2), ("mistral-like", 2)]


@pytest.mark.parametrize("special", [False, True])
@pytest.mark.parametrize("template, calls", SYNTAXES)
def test_calls_in_the_templates_own_syntax_come_back_as_calls(tiny_model, template, calls, special):
    """What the template renders for a turn with text and calls (nested arguments), as the model writes it and as
    decoding gives it back, reads back as exactly those calls and that text; without text, as the calls alone."""
    from ftkit.inference.replies import parse_reply

    tokenizer, chat_format = syntax_format(tiny_model, template, special)
    assert chat_format.features.tool_call_style == "template"
    for content in ("Let me check.", ""):
        written = as_generated(chat_format, call_turn(CALLS, content), TOOLS)
        decoded = tokenizer.decode(tokenizer.encode(written, add_special_tokens=False), skip_special_tokens=True)
        assert (decoded != written) == special
        reply = parse_reply(decoded, chat_format.tool_call_style)
        assert reply.tool_calls == [{"name": n, "arguments": a} for n, a in CALLS[:calls]], decoded
        assert reply.content == content and reply.reasoning is None


@pytest.mark.parametrize("template, calls", SYNTAXES)
def test_text_that_is_not_a_well_formed_call_stays_text_whole(tiny_model, template, calls):
    from ftkit.inference.replies import parse_reply

    _, chat_format = syntax_format(tiny_model, template)
    style = chat_format.tool_call_style
    written = as_generated(chat_format, call_turn(CALLS[:1]), TOOLS)
    args = json.dumps(CALLS[0][1])
    assert args in written
    for broken in (written.replace(args, args[:-1]),  # cut short
                   written.replace(args, "{city: Tinyville}"),  # not JSON
                   written.replace(args, "[1, 2]"),  # not an object
                   written.replace("get_weather", "get weather"),  # not a name
                   "The weather is sunny.", "", '{"city": "Tinyville"}'):
        assert parse_reply(broken, style).tool_calls == [] and parse_reply(broken, style).content == broken, broken
    assert parse_reply(written, None).content == written  # no tools in the request: no calls read


@pytest.mark.parametrize("template", ["gemma4.jinja", "lfm2_2_5.jinja", "muse_glimmer.jinja"])
def test_templates_whose_arguments_are_not_json_keep_calls_as_text(tiny_model, template):
    """Gemma 4's call:NAME{key:<|"|>value<|"|>}, LFM2's [NAME(key='value')], XML parameters: no syntax to read."""
    from ftkit.inference.replies import parse_reply

    _, chat_format = syntax_format(tiny_model, template)
    assert chat_format.features.arguments == "object" and chat_format.features.call_syntax is None
    written = as_generated(chat_format, call_turn(CALLS[:1], ""), TOOLS)
    assert "get_weather" in written and parse_reply(written, chat_format.tool_call_style).content == written


def test_template_features_stay_picklable_and_hashable(tiny_model):
    import pickle

    _, chat_format = syntax_format(tiny_model, "gptoss.jinja")
    features = chat_format.features
    again = pickle.loads(pickle.dumps(features))
    assert again == features and hash(again) == hash(features)
    assert pickle.loads(pickle.dumps(chat_format.tool_call_style)) == chat_format.tool_call_style


def test_serve_returns_tool_calls_written_in_the_templates_own_syntax(tiny_model, monkeypatch):
    """OpenAI `tool_calls` from a gpt-oss-template answer, plain and streamed; without tools the answer is text."""
    from fastapi.testclient import TestClient

    from ftkit.commands.serve import Engine, create_app
    from ftkit.inference import generate
    from ftkit.inference.options import GenerationOptions

    _, chat_format = syntax_format(tiny_model, "gptoss.jinja")
    written = as_generated(chat_format, call_turn(CALLS[:1]), TOOLS)
    monkeypatch.setattr(generate, "sample", lambda *args, **kwargs: [generate.Choice(written, 9, "stop")])
    client = TestClient(create_app(Engine(None, chat_format, "m", GenerationOptions())))
    ask = {"messages": [USER], "tools": TOOLS}
    message = client.post("/v1/chat/completions", json=ask).json()["choices"][0]["message"]
    [call] = message["tool_calls"]
    assert call["function"]["name"] == CALLS[0][0] and json.loads(call["function"]["arguments"]) == CALLS[0][1]
    assert message["content"] == "Let me check."
    streamed = client.post("/v1/chat/completions", json={**ask, "stream": True}).text
    chunks = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    [delta] = [c["choices"][0]["delta"] for c in chunks if c["choices"][0]["delta"].get("tool_calls")]
    assert delta["tool_calls"][0]["function"]["name"] == CALLS[0][0]
    plain = client.post("/v1/chat/completions", json={"messages": [USER]}).json()["choices"][0]
    assert plain["message"]["content"] == written and "tool_calls" not in plain["message"]


def test_tool_parameters_given_as_json_text_become_the_schema_object():
    from ftkit.config.templates import normalise_tools

    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    assert normalise_tools([{"name": "f", "parameters": json.dumps(schema)}]) == [
        {"type": "function", "function": {"name": "f", "parameters": schema}}]
