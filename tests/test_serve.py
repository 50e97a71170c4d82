"""ftkit serve (FastAPI + uvicorn): the OpenAI client gets the trained tiny model's exact answers, streamed and
not; n, stop, include_usage and /v1/completions behave as OpenAI's; bad numbers and over-long prompts get 400
before they queue; a full queue gets 503 and never a reset; a client that leaves mid-stream stops generation."""

from __future__ import annotations

import http.client
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import openai
import pytest

from tests.helpers import CHATS, MULTI_TURN, ROOT, SYSTEM

KEY = "test-key"
QUEUE = 2
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(trained_run, tmp_path_factory):
    """`ftkit serve` on 127.0.0.1 and a free port (--port 0), greedy, with an API key; stopped at the end."""
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ftkit", "serve", "--adapter", str(trained_run), "--port", "0", "--temperature",
             "0", "--name", "tiny-chat", "--queue-size", str(QUEUE), "--api-key", KEY],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True, env=dict(os.environ))
        try:
            lines = startup_lines(proc, timeout=180)
            url = re.search(r" on (http://\S+)/v1 ", lines[0]).group(1)
            yield SimpleNamespace(url=url, lines=lines, log=log_path, run=trained_run)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def startup_lines(proc, timeout: float) -> list[str]:
    """stdout up to the production line and the note after it (a reader thread: readline has no timeout)."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line.rstrip("\n")) for line in proc.stdout], daemon=True).start()
    seen, deadline = [], time.monotonic() + timeout
    while len(seen) < 3:
        try:
            seen.append(lines.get(timeout=max(deadline - time.monotonic(), 0.1)))
        except queue.Empty:
            raise AssertionError(f"ftkit serve did not start listening in time (exit {proc.poll()}): {seen}") from None
    return seen


def client(server, key: str = KEY):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=120)


def post(server, body, path: str = "/v1/chat/completions", key: str | None = KEY):
    """(status, JSON) of a POST whose body is sent exactly as given when it is bytes (NaN, Infinity)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(f"{server.url}{path}", data=data, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def open_stream(server, body: dict) -> http.client.HTTPConnection:
    """A streaming request whose response has started (so it holds a queue slot); the caller closes it."""
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    response = conn.getresponse()
    assert response.status == 200, response.read()
    return conn


def conversation(question: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def test_startup_prints_the_url_and_the_vllm_line(server, tiny_model):
    assert server.lines[0].startswith("ftkit serve: model 'tiny-chat' on http://127.0.0.1:")
    assert server.lines[1] == (f"ftkit serve: in production: vllm serve {tiny_model} --enable-lora "
                               f"--lora-modules tiny-chat={server.run.resolve()}")
    assert "modules_to_save (embed_tokens, lm_head)" in server.lines[2] and "ftkit merge" in server.lines[2]


def test_openai_client_gets_the_trained_answers_streamed_and_not(server):
    api = client(server)
    assert [m.id for m in api.models.list().data] == ["tiny-chat"]
    for question, answer in (CHATS[0], CHATS[3]):
        reply = api.chat.completions.create(model="tiny-chat", messages=conversation(question))
        assert reply.choices[0].message.content == answer and reply.choices[0].finish_reason == "stop"
        assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
        chunks = list(api.chat.completions.create(model="tiny-chat", messages=conversation(question), stream=True))
        pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert "".join(pieces) == answer and len(pieces) > 2
        assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == "stop"
        assert all(c.usage is None for c in chunks)  # no include_usage: no usage chunk
    (q1, a1), (q2, a2) = MULTI_TURN
    history = conversation(q1) + [{"role": "assistant", "content": a1}, {"role": "user", "content": q2}]
    assert api.chat.completions.create(model="tiny-chat", messages=history).choices[0].message.content == a2
    short = api.chat.completions.create(model="tiny-chat", messages=conversation(CHATS[0][0]), max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2


def test_n_choices_and_stop_strings(server):
    api = client(server)
    question, answer = CHATS[1]  # "Zorb has three moons: Pim, Pom and Pum."
    both = api.chat.completions.create(model="tiny-chat", messages=conversation(question), n=2, temperature=0)
    assert [c.message.content for c in both.choices] == [answer, answer] and [c.index for c in both.choices] == [0, 1]
    cut = api.chat.completions.create(model="tiny-chat", messages=conversation(question), stop=["Pom", " three"])
    assert cut.choices[0].message.content == "Zorb has" and cut.choices[0].finish_reason == "stop"
    chunks = list(api.chat.completions.create(model="tiny-chat", messages=conversation(question), stop="moons:",
                                              n=2, stream=True))
    for index in (0, 1):
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == index)
        assert text == "Zorb has three "
    assert sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason == "stop") == [0, 1]


def test_stream_options_include_usage(server):
    api = client(server)
    question, _ = CHATS[2]
    plain = api.chat.completions.create(model="tiny-chat", messages=conversation(question))
    chunks = list(api.chat.completions.create(model="tiny-chat", messages=conversation(question), stream=True,
                                              stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == plain.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_takes_a_plain_prompt_without_the_chat_template(server):
    question, answer = CHATS[0]
    prompt = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
              "<|im_start|>assistant\n")  # the tiny model's ChatML, written out: the server must not wrap it again
    reply = client(server).completions.create(model="tiny-chat", prompt=prompt, max_tokens=200)
    assert reply.object == "text_completion" and reply.choices[0].text == answer
    assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens > 0
    streamed = client(server).completions.create(model="tiny-chat", prompt=prompt, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == answer
    status, body = post(server, {"prompt": ["Zorb", "Zorb"], "max_tokens": 3}, "/v1/completions")
    assert status == 200 and [c["index"] for c in body["choices"]] == [0, 1]
    assert body["choices"][0]["text"] == body["choices"][1]["text"] and body["usage"]["completion_tokens"] == 6


def test_bad_numbers_get_400_in_openai_error_shape(server):
    hi = '{"messages": [{"role": "user", "content": "hi"}], '
    cases = {"temperature": ['"temperature": NaN', '"temperature": 2.5'], "max_tokens": ['"max_tokens": Infinity',
             '"max_tokens": -1'], "seed": [f'"seed": {2**70}', '"seed": -1'], "top_p": ['"top_p": 0'], "n": ['"n": 0']}
    bad = [(f"{hi}{field}}}", param) for param, fields in cases.items() for field in fields]
    for raw, param in bad + [('{"messages": [{"role": "wizard", "content": "x"}]}', "messages.0.role")]:
        status, body = post(server, raw.encode())
        assert status == 400, (raw, body)
        assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["param"] == param, body
        assert body["error"]["type"] == "invalid_request_error"
    status, body = post(server, b"{not json")
    assert status == 400 and body["error"]["message"].startswith("the request body is not valid JSON")
    with pytest.raises(openai.BadRequestError) as err:
        client(server).chat.completions.create(model="tiny-chat", messages=[{"role": "assistant", "content": "hi"}])
    assert "the last message must be a user (or tool) turn" in err.value.message


@pytest.mark.parametrize("raw, headers, param, message", [
    (b'{"messages": [{"role": "tool", "content": "42", "tool_call_id": "c1"}]}', {}, "messages",
     "messages: turn 1: a tool result must follow an assistant turn that calls a tool"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": '
     b'{"name": "f", "parameters": 7}}]}', {}, "tools", "tools: the parameters of tool 'f' must be a JSON schema"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', {"content-type": "text/plain"}, None,
     "the request body must be a JSON object, sent with Content-Type: application/json"),
    (b'[1]', {}, None, "the request body must be a JSON object"),
    (b'', {}, None, "the request body is empty: send a JSON object"),
])
def test_requests_openai_refuses_are_400_before_the_model(raw, headers, param, message):
    from fastapi.testclient import TestClient

    from ftkit.commands.serve import create_app

    app = create_app(SimpleNamespace(name="m", created=0))  # refused before the engine generates anything
    response = TestClient(app).post("/v1/chat/completions", content=raw,
                                    headers={"content-type": "application/json", **headers})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == param and error["message"].startswith(message), error


def test_absurd_max_tokens_is_capped_at_the_context(server):
    question, answer = CHATS[4]
    status, body = post(server, {"messages": conversation(question), "max_tokens": 10**9})
    assert status == 200 and body["choices"][0]["message"]["content"] == answer
    status, body = post(server, {"prompt": "word " * 200, "max_tokens": 10**9, "min_tokens": 10**9}, "/v1/completions")
    assert status == 200 and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["total_tokens"] == 1024 and body["usage"]["completion_tokens"] < 100  # the context is full


def test_prompt_longer_than_the_context_is_400_and_the_server_goes_on(server):
    status, body = post(server, {"messages": conversation("word " * 2000)})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded" and body["error"]["param"] == "messages"
    assert "context is 1024" in body["error"]["message"]
    status, body = post(server, {"prompt": "word " * 2000}, "/v1/completions")
    assert status == 400 and body["error"]["param"] == "prompt"
    question, answer = CHATS[0]
    status, body = post(server, {"messages": conversation(question)})
    assert status == 200 and body["choices"][0]["message"]["content"] == answer


def test_twenty_concurrent_clients_get_answers_or_503_never_a_reset(server):
    question, answer = CHATS[0]

    def ask(_):
        return post(server, {"messages": conversation(question), "max_tokens": 4})

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(ask, range(20)))  # a reset or refused connection raises here
    assert {status for status, _ in results} <= {200, 503}, results
    answers = [body["choices"][0]["message"]["content"] for status, body in results if status == 200]
    assert answers and len(set(answers)) == 1 and answers[0] and answer.startswith(answers[0])
    assert all(body["error"]["code"] == "server_busy" for status, body in results if status == 503)


def test_full_queue_gets_503_but_bad_requests_still_get_400_and_leaving_clients_free_it(server):
    """QUEUE + 1 streams that would generate 900 tokens each fill the server; closing them frees it."""
    long = {"prompt": "The capital", "max_tokens": 900, "min_tokens": 900}
    cancelled = re.compile(r"stream cancelled \(.*?\) after (\d+) generated tokens")
    before = len(cancelled.findall(server.log.read_text()))
    streams = [open_stream(server, long) for _ in range(QUEUE + 1)]
    try:
        status, body = post(server, {"messages": conversation(CHATS[0][0])})
        assert status == 503 and body["error"]["code"] == "server_busy" and body["error"]["type"] == "server_error"
        status, _ = post(server, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}')
        assert status == 400  # validated before the queue
        assert post(server, {"messages": conversation("word " * 2000)})[0] == 400
        with urllib.request.urlopen(f"{server.url}/health", timeout=30) as response:
            assert json.loads(response.read()) == {"status": "ok", "model": "tiny-chat"}
    finally:
        for conn in streams:
            conn.close()
    deadline, tokens = time.monotonic() + 60, []
    while time.monotonic() < deadline and len(tokens) < QUEUE + 1:
        tokens = [int(n) for n in cancelled.findall(server.log.read_text())[before:]]
        time.sleep(0.2)
    assert len(tokens) == QUEUE + 1 and max(tokens) < 900, tokens
    question, answer = CHATS[5]
    status, body = post(server, {"messages": conversation(question)})
    assert status == 200 and body["choices"][0]["message"]["content"] == answer


def test_api_key_is_required_on_v1(server):
    for key in (None, "wrong"):
        status, body = post(server, {"messages": conversation(CHATS[0][0])}, key=key)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").models.list()
    with urllib.request.urlopen(f"{server.url}/health", timeout=30) as response:
        assert response.status == 200
    status, body = post(server, {"messages": conversation(CHATS[0][0]), "max_tokens": 1})
    assert status == 200 and body["usage"]["completion_tokens"] == 1


def test_tools_reach_the_chat_template_and_tool_call_arguments_become_objects(server):
    from ftkit.commands.openai_schema import ChatRequest
    from ftkit.data.chat_format import ChatFormat
    from ftkit.inference.loading import open_tokenizer

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    request = ChatRequest.model_validate({"messages": messages, "tools": tools})
    assert request.messages[1].for_template()["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    tokenizer = open_tokenizer(server.run)
    template = "{% if tools %}TOOLS: {{ tools | map(attribute='function.name') | join(',') }}\n{% endif %}"
    chat_format = ChatFormat(tokenizer, template + tokenizer.chat_template)
    prompt = chat_format.prompt([m.for_template() for m in request.messages], tools=request.tools)
    assert prompt.startswith("TOOLS: get_weather\n<|im_start|>user\nWeather?")
    status, body = post(server, {"messages": messages, "tools": tools, "tool_choice": "auto", "max_tokens": 3})
    assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"


def test_production_line_for_a_merged_model_and_a_high_rank_adapter(tmp_path):
    from ftkit.commands.serve import production_line

    merged = tmp_path / "merged model"
    assert production_line(None, merged, None, "m") == (f"vllm serve '{merged}' --served-model-name m", "")
    adapter = tmp_path / "run"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/base", "r": 8,
                                                             "rank_pattern": {"q_proj": 64}, "modules_to_save": None}))
    line, note = production_line(adapter, None, None, "mine")
    assert line == f"vllm serve org/base --enable-lora --lora-modules mine={adapter} --max-lora-rank 64" and note == ""
    assert production_line(adapter, None, "local/base", "mine")[0].startswith("vllm serve local/base ")
