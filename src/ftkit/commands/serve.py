"""Serve stage: an OpenAI-compatible HTTP server for a trained model, standard library only.

Endpoints: POST /v1/chat/completions (with and without `stream`), GET /v1/models, GET /health. Prompts are
built with the run's chat template and generation stops at its end-of-turn token, exactly as in `ftkit
chat`. One generation runs at a time; up to `queue_size` more requests wait, and beyond that a request is
answered 503 at once. A malformed request gets a 400 with an OpenAI-style JSON error and the server keeps
running. ThreadingHTTPServer needs nothing beyond Python; one model generates one answer at a time anyway.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
import uuid
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ftkit.inference.options import GenerationOptions
from ftkit.errors import FtkitError

MAX_BODY = 16 * 2**20
ROLES = ("system", "user", "assistant")


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


class Engine:
    """The model, its chat format, default options, and the one-at-a-time gate with a bounded queue."""

    def __init__(self, model, chat_format, name: str, defaults: GenerationOptions, queue_size: int = 8):
        self.model, self.chat_format, self.name, self.defaults = model, chat_format, name, defaults
        self.queue_size = queue_size
        self.gate = threading.Lock()  # one generation at a time
        self.count_lock = threading.Lock()
        self.waiting_or_running = 0
        self.created = int(time.time())

    def admit(self) -> None:
        with self.count_lock:
            if self.waiting_or_running >= self.queue_size + 1:
                raise RequestError(503, f"server busy: {self.queue_size} requests already waiting; retry later",
                                   kind="server_busy")
            self.waiting_or_running += 1

    def leave(self) -> None:
        with self.count_lock:
            self.waiting_or_running -= 1


def parse_messages(raw) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise RequestError(400, "'messages' must be a non-empty list of {role, content}", "messages")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RequestError(400, f"messages[{i}]: role must be one of {', '.join(ROLES)}", "messages")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise RequestError(400, f"messages[{i}]: only text content parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError(400, f"messages[{i}]: content must be a string", "messages")
        messages.append({"role": m["role"], "content": content})
    if messages[-1]["role"] != "user":
        raise RequestError(400, "the last message must be a user turn", "messages")
    return messages


def number(body: dict, key: str, kind, low=None, high=None):
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise RequestError(400, f"'{key}' must be a{'n integer' if kind is int else ' number'}", key)
    if (low is not None and value < low) or (high is not None and value > high):
        raise RequestError(400, f"'{key}' must be between {low} and {high}", key)
    return kind(value)


def parse_request(body, defaults: GenerationOptions) -> tuple[list[dict], GenerationOptions, bool]:
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    messages = parse_messages(body.get("messages"))
    if number(body, "n", int, 1, 1) not in (None, 1):
        raise RequestError(400, "only n=1 is supported", "n")
    if body.get("stop") not in (None, [], ""):
        raise RequestError(400, "'stop' is not supported: generation stops at the model's end-of-turn token", "stop")
    options = replace(defaults)
    max_tokens = number(body, "max_completion_tokens", int, 1) or number(body, "max_tokens", int, 1)
    if max_tokens:
        options.max_new_tokens = max_tokens
    temperature = number(body, "temperature", float, 0, 2)
    if temperature is not None:
        options.temperature, options.greedy = temperature, temperature == 0
    for key, kind, low, high in (("top_p", float, 0, 1), ("top_k", int, 0, None), ("seed", int, None, None),
                                 ("repetition_penalty", float, 0.01, None), ("no_repeat_ngram_size", int, 0, None)):
        value = number(body, key, kind, low, high)
        if value is not None:
            setattr(options, key, value)
    if options.top_p == 0:
        raise RequestError(400, "'top_p' must be greater than 0", "top_p")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, "'stream' must be true or false", "stream")
    return messages, options, stream


class Handler(BaseHTTPRequestHandler):
    server_version = "ftkit"
    engine: Engine  # set on the subclass make_server builds

    def log_message(self, format, *args):  # one line per request on stderr, no reverse DNS
        sys.stderr.write(f"{self.address_string()} - {format % args}\n")

    def send_json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_error_json(self, err: RequestError) -> None:
        self.send_json(err.status, {"error": {"message": err.message, "type": err.kind, "param": err.param,
                                              "code": err.status}})

    def do_GET(self):
        path = self.path.split("?")[0].rstrip("/")
        if path == "/health":
            self.send_json(200, {"status": "ok", "model": self.engine.name})
        elif path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [self.model_entry()]})
        elif path == f"/v1/models/{self.engine.name}":
            self.send_json(200, self.model_entry())
        else:
            self.send_error_json(RequestError(404, f"no route GET {path}", kind="not_found"))

    def model_entry(self) -> dict:
        return {"id": self.engine.name, "object": "model", "created": self.engine.created, "owned_by": "ftkit"}

    def do_POST(self):
        path = self.path.split("?")[0].rstrip("/")
        try:
            if path != "/v1/chat/completions":
                raise RequestError(404, f"no route POST {path}", kind="not_found")
            body = self.read_json()
            messages, options, stream = parse_request(body, self.engine.defaults)
            self.engine.admit()
            try:
                with self.engine.gate:
                    if stream:
                        self.stream_completion(messages, options)
                    else:
                        self.complete(messages, options)
            finally:
                self.engine.leave()
        except RequestError as err:
            self.send_error_json(err)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away
        except Exception as err:  # a generation failure: report it, keep serving
            self.log_message("error: %s: %s", type(err).__name__, err)
            try:
                self.send_error_json(RequestError(500, f"{type(err).__name__}: {err}", kind="server_error"))
            except OSError:
                pass

    def read_json(self):
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise RequestError(400, "bad Content-Length header") from None
        if length <= 0:
            raise RequestError(400, "empty request body: send a JSON object")
        if length > MAX_BODY:
            raise RequestError(413, "request body too large")
        raw = self.rfile.read(length)
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RequestError(400, f"the request body is not valid JSON: {err}") from None

    def envelope(self, kind: str) -> dict:
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": kind, "created": int(time.time()),
                "model": self.engine.name}

    def finish_reason(self, ids: list[int], options: GenerationOptions) -> str:
        from ftkit.inference.generate import stop_ids

        return "stop" if ids and ids[-1] in stop_ids(self.engine.chat_format) or len(ids) < options.max_new_tokens \
            else "length"

    def complete(self, messages, options) -> None:
        from ftkit.inference.generate import generate_ids

        engine = self.engine
        prompt_tokens, ids = generate_ids(engine.model, engine.chat_format, messages, options)
        text = engine.chat_format.tokenizer.decode(ids, skip_special_tokens=True)
        self.send_json(200, {**self.envelope("chat.completion"), "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text},
             "finish_reason": self.finish_reason(ids, options), "logprobs": None}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(ids),
                      "total_tokens": prompt_tokens + len(ids)}})

    def stream_completion(self, messages, options) -> None:
        """Server-sent events: a role chunk, one chunk per piece of text, a finish chunk, then [DONE]."""
        import transformers

        from ftkit.inference.generate import char_streamer, generate_ids

        engine, pieces, cancelled = self.engine, queue.Queue(), threading.Event()
        result: dict = {}

        class Cancel(transformers.StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return cancelled.is_set()

        def work():
            try:
                result["out"] = generate_ids(engine.model, engine.chat_format, messages, options,
                                             streamer=char_streamer(engine.chat_format.tokenizer, pieces.put),
                                             stopping_criteria=transformers.StoppingCriteriaList([Cancel()]))
            except Exception as err:  # reported to the client below
                result["error"] = err
            finally:
                pieces.put(None)

        head = self.envelope("chat.completion.chunk")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        try:
            self.event({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                             "finish_reason": None}]})
            while (piece := pieces.get()) is not None:
                self.event({**head, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
            if "error" in result:
                err = result["error"]
                self.event({"error": {"message": f"{type(err).__name__}: {err}", "type": "server_error"}})
            else:
                prompt_tokens, ids = result["out"]
                self.event({**head, "choices": [{"index": 0, "delta": {},
                                                 "finish_reason": self.finish_reason(ids, options)}],
                            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(ids),
                                      "total_tokens": prompt_tokens + len(ids)}})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        finally:
            cancelled.set()  # a client that left stops the generation at the next token
            worker.join()

    def event(self, payload: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(payload, ensure_ascii=False).encode("utf-8") + b"\n\n")
        self.wfile.flush()


def make_server(engine: Engine, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    handler = type("FtkitHandler", (Handler,), {"engine": engine})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as err:
        raise FtkitError(f"cannot listen on {host}:{port} ({err.strerror or err}); choose another --port") from None
    server.daemon_threads = True
    return server


def run_serve(adapter: Path | None, model_dir: Path | None, base: str | None, options: GenerationOptions,
              host: str = "127.0.0.1", port: int = 8000, queue_size: int = 8, name: str | None = None,
              dtype: str | None = None, trust_remote_code: bool = False) -> None:
    from ftkit.inference.loading import load_for_chat, quiet_loading

    options.check()
    if queue_size < 0:
        raise FtkitError("--queue-size must be 0 or more")
    if not 0 <= port <= 65535:
        raise FtkitError(f"--port must be in 0..65535 (0: any free port), got {port}")
    quiet_loading()
    model, _, chat_format = load_for_chat(adapter, model_dir, base, dtype, trust_remote_code)
    source = Path(adapter or model_dir)
    engine = Engine(model, chat_format, name or source.resolve().name, options, queue_size)
    server = make_server(engine, host, port)
    bound_host, bound_port = server.server_address[:2]
    print(f"ftkit serve: model '{engine.name}' on http://{bound_host}:{bound_port}/v1 "
          "(POST /v1/chat/completions, GET /v1/models, GET /health); Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
