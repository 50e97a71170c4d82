"""ftkit serve: the OpenAI Python client talks to the trained tiny model, streaming and not; malformed
requests get a 400 with a JSON error and the server keeps answering; a full queue gets a 503."""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tests.helpers import ROOT
from tests.helpers import CHATS, MULTI_TURN, SYSTEM

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server(trained_run, tmp_path_factory):
    """`ftkit serve` on 127.0.0.1 and a free port (--port 0), stopped at the end."""
    tmp = tmp_path_factory.mktemp("serve")
    run = trained_run
    log = (tmp / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "ftkit", "serve", "--adapter", str(run), "--port", "0",
                             "--temperature", "0", "--name", "tiny-chat"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=log, text=True, env=dict(os.environ))
    try:
        url = wait_for_url(proc, timeout=120)
        assert url.startswith("http://127.0.0.1:"), url
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def wait_for_url(proc, timeout: float) -> str:
    selector, deadline = selectors.DefaultSelector(), time.monotonic() + timeout
    selector.register(proc.stdout, selectors.EVENT_READ)
    while time.monotonic() < deadline:
        if selector.select(timeout=1):
            line = proc.stdout.readline()
            if not line:
                raise AssertionError(f"ftkit serve exited with {proc.wait()} before listening")
            if " on http://" in line:
                return line.split(" on ", 1)[1].split()[0].removesuffix("/v1")
    raise AssertionError("ftkit serve did not start listening in time")


def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def post(url, body: bytes):
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def conversation(question):
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


@pytest.mark.slow
def test_openai_client_gets_the_trained_answers(server):
    api = client(server)
    assert [m.id for m in api.models.list().data] == ["tiny-chat"]
    for question, answer in (CHATS[0], CHATS[5]):
        reply = api.chat.completions.create(model="tiny-chat", messages=conversation(question))
        assert reply.choices[0].message.content == answer
        assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens > 0
    (q1, a1), (q2, a2) = MULTI_TURN
    history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q1},
               {"role": "assistant", "content": a1}, {"role": "user", "content": q2}]
    assert api.chat.completions.create(model="tiny-chat", messages=history).choices[0].message.content == a2
    short = api.chat.completions.create(model="tiny-chat", messages=conversation(CHATS[0][0]), max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2


@pytest.mark.slow
def test_openai_client_streams_the_trained_answer(server):
    question, answer = CHATS[3]
    stream = client(server).chat.completions.create(model="tiny-chat", messages=conversation(question), stream=True)
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == answer and len(pieces) > 2  # streamed in pieces, each whole characters
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    with urllib.request.urlopen(urllib.request.Request(
            f"{server}/v1/chat/completions", method="POST", headers={"Content-Type": "application/json"},
            data=json.dumps({"messages": conversation(question), "stream": True}).encode()), timeout=60) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        assert response.read().decode().endswith("data: [DONE]\n\n")


@pytest.mark.slow
def test_malformed_requests_get_400_and_the_server_keeps_serving(server):
    status, body = post(server, b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"].startswith("the request body is not valid JSON")
    for bad, param in (({"messages": "hi"}, "messages"), ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
                       ({"messages": conversation("x"), "temperature": "hot"}, "temperature"),
                       ({"messages": conversation("x"), "n": 2}, "n"), ([1, 2], None)):
        status, body = post(server, json.dumps(bad).encode())
        assert status == 400 and body["error"]["param"] == param, body
    with pytest.raises(openai.BadRequestError) as err:
        client(server).chat.completions.create(model="tiny-chat", messages=[{"role": "assistant", "content": "hi"}])
    assert err.value.status_code == 400 and "last message must be a user turn" in err.value.message
    with urllib.request.urlopen(f"{server}/health", timeout=10) as response:
        assert json.loads(response.read()) == {"status": "ok", "model": "tiny-chat"}
    status, body = post(server, json.dumps({"messages": conversation(CHATS[1][0])}).encode())
    assert status == 200 and body["choices"][0]["message"]["content"] == CHATS[1][1]


@pytest.mark.slow
def test_concurrent_requests_wait_their_turn(server):
    from concurrent.futures import ThreadPoolExecutor

    api = client(server)
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda qa: api.chat.completions.create(
            model="tiny-chat", messages=conversation(qa[0])).choices[0].message.content, CHATS[:4]))
    assert replies == [answer for _, answer in CHATS[:4]]


def test_full_queue_gets_503_at_once():
    """In-process, no model: one request 'running' with queue_size 0 fills the server."""
    import threading

    from ftkit.inference.options import GenerationOptions
    from ftkit.commands.serve import Engine, make_server

    engine = Engine(model=None, chat_format=None, name="m", defaults=GenerationOptions(), queue_size=0)
    httpd = make_server(engine, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        engine.admit()  # the one generation slot is taken
        status, body = post(url, json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode())
        assert status == 503 and body["error"]["type"] == "server_busy"
        with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
            assert response.status == 200
    finally:
        httpd.shutdown()
        httpd.server_close()
