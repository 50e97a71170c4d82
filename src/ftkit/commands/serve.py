"""Serve stage: an OpenAI-compatible HTTP server for a trained model on FastAPI + uvicorn, the stack of
`transformers serve` and vLLM's server, so connections, SSE framing and request validation are the libraries'.

Endpoints: POST /v1/chat/completions and /v1/completions (stream or not), GET /v1/models, GET /health.
Prompts use the run's chat template (and the chat_template_kwargs it was trained with) and stop at its end-of-turn
token, as in `ftkit chat`; a chat request's messages are read as training data is (data/messages.py). With `tools`
in the request, tool calls the model writes in its template's syntax come back as `tool_calls` (a stream then sends
each answer whole, in one chunk); a leading <think> block comes back as `reasoning_content`. The model
generates in one worker thread, one request at a time; up to --queue-size more wait, and beyond that a
request is answered 503 at once. Requests that cannot be served (bad numbers, a prompt longer than the
context) are answered 400 before they queue. This module is HTTP only: generation is ftkit.inference.generate.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ftkit.commands import openai_schema as schema
from ftkit.commands.openai_schema import ChatRequest, CompletionRequest, Sampling
from ftkit.data.call_syntax import CallSyntax
from ftkit.errors import FtkitError
from ftkit.inference.options import GenerationOptions
from ftkit.inference.vllm import production_line

MAX_BODY = 16 * 2**20
BACKLOG = 2048  # connections the kernel holds while the event loop is busy; beyond the queue they get 503
log = logging.getLogger("uvicorn.error")  # uvicorn's own log: one stream for the server's lines


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, schema.error_body(message, kind, param, code)


class Engine:
    """The model, its chat format and default options; one generation thread behind a bounded queue."""

    def __init__(self, model, chat_format, name: str, defaults: GenerationOptions, queue_size: int = 8,
                 context: int | None = None):
        self.model, self.chat_format, self.name, self.defaults = model, chat_format, name, defaults
        self.queue_size, self.context = queue_size, context
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="ftkit-generate")
        self.lock = threading.Lock()
        self.pending = 0  # running + waiting
        self.live: set[threading.Event] = set()
        self.created = int(time.time())

    def admit(self) -> None:
        with self.lock:
            if self.pending > self.queue_size:
                raise ApiError(503, f"server busy: {self.queue_size} requests already wait for the model; "
                               "retry later", kind="server_error", code="server_busy")
            self.pending += 1

    def submit(self, work, cancelled: threading.Event) -> Future:
        """Queue `work` for the generation thread. Its slot frees when the work ends, not when the client
        leaves: a client that leaves sets `cancelled`, which ends the work at its next token."""
        self.admit()
        with self.lock:
            self.live.add(cancelled)

        def done(_):
            with self.lock:
                self.pending -= 1
                self.live.discard(cancelled)

        future = self.worker.submit(work)
        future.add_done_callback(done)
        return future

    def close(self) -> None:
        """Stop every running and queued generation at its next token (server shutdown)."""
        with self.lock:
            for event in self.live:
                event.set()

    def options(self, request: Sampling, prompt_tokens: int, param: str) -> GenerationOptions:
        """The server defaults with the request's overrides; max tokens capped at the context left."""
        room = None if self.context is None else self.context - prompt_tokens
        if room is not None and room < 1:
            raise ApiError(400, f"the prompt is {prompt_tokens} tokens and this model's context is {self.context}, "
                           "leaving no room for an answer: shorten it", param=param, code="context_length_exceeded")
        options = replace(self.defaults)
        options.max_new_tokens = min(request.limit() or options.max_new_tokens, room or float("inf"))
        if request.temperature is not None:
            options.temperature, options.greedy = request.temperature, request.temperature == 0
        for key in ("top_p", "repetition_penalty", "seed"):
            if getattr(request, key) is not None:
                setattr(options, key, getattr(request, key))
        if request.top_k is not None:
            options.top_k = max(request.top_k, 0)
        options.min_new_tokens = min(request.min_tokens or 0, options.max_new_tokens)
        return options


def create_app(engine: Engine, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="ftkit serve")

    async def guard(request: Request) -> None:
        if int(request.headers.get("content-length") or 0) > MAX_BODY:
            raise ApiError(413, "request body too large")
        sent = request.headers.get("authorization", "").encode()
        if api_key is not None and not secrets.compare_digest(sent, f"Bearer {api_key}".encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(guard)])
    entry = {"id": engine.name, "object": "model", "created": engine.created, "owned_by": "ftkit"}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.name}

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [entry]}

    @v1.get("/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != engine.name:
            raise ApiError(404, f"no model '{model_id}' here; this server has '{engine.name}'", param="model",
                           code="model_not_found")
        return entry

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatRequest):
        return await respond(engine, body, [chat_prompt(engine, body)], "messages", chat=True)

    @v1.post("/completions")
    async def completions(body: CompletionRequest):
        tokenizer = engine.chat_format.tokenizer  # special tokens (a bos) are added, as vLLM does
        return await respond(engine, body, [tokenizer(p)["input_ids"] for p in body.prompt], "prompt", chat=False)

    app.include_router(v1)
    add_error_handlers(app)
    return app


def add_error_handlers(app: FastAPI) -> None:
    """Every error leaves in OpenAI's shape {"error": {message, type, param, code}}; validation errors are 400."""

    @app.exception_handler(ApiError)
    async def api_error(request, err: ApiError):
        retry = {"Retry-After": "1"} if err.status == 503 else None  # the openai client waits that long, then retries
        return JSONResponse(err.body, status_code=err.status, headers=retry)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, err: RequestValidationError):
        return JSONResponse(schema.validation_error_body(list(err.errors())), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request, err: HTTPException):
        kind = "not_found" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(schema.error_body(str(err.detail), kind), status_code=err.status_code, headers=err.headers)

    @app.exception_handler(Exception)
    async def crashed(request, err: Exception):
        return JSONResponse(schema.error_body(f"{type(err).__name__}: {err}", "server_error"), status_code=500)


def chat_prompt(engine: Engine, body: ChatRequest) -> list[int]:
    """The request read as training data is read (messages, tools, chat_template_kwargs), then the run's prompt."""
    from jinja2 import TemplateError

    from ftkit.config.templates import template_kwargs_problem
    from ftkit.data.messages import BadRow, normalise_tools, orphan_tool_result
    from ftkit.inference.generate import prompt_ids

    try:
        messages = [m.for_template(number) for number, m in enumerate(body.messages, 1)]
    except BadRow as err:
        raise ApiError(400, f"messages: {err}", param="messages") from None
    orphan = orphan_tool_result(messages)
    if orphan:
        raise ApiError(400, f"messages: {orphan}", param="messages")
    try:
        tools = normalise_tools(body.tools, "tools")
    except BadRow as err:
        raise ApiError(400, str(err), param="tools") from None
    problem = body.chat_template_kwargs is not None and template_kwargs_problem(body.chat_template_kwargs)
    if problem:
        raise ApiError(400, f"chat_template_kwargs {problem}", param="chat_template_kwargs")
    try:
        return prompt_ids(engine.chat_format, messages, tools, body.chat_template_kwargs)
    except FtkitError as err:
        raise ApiError(400, str(err), param="messages") from None
    except (TemplateError, TypeError, ValueError, KeyError) as err:
        raise ApiError(400, f"the chat template cannot render these messages: {err}", param="messages") from None


def generate_all(engine: Engine, prompts, options, body: Sampling, cancelled, on_text=None) -> list:
    """body.n choices per prompt, in OpenAI's order (prompt-major); runs in the generation thread."""
    from ftkit.inference.generate import sample

    choices = []
    for p, (ids, opts) in enumerate(zip(prompts, options)):
        if cancelled.is_set():
            break
        emit = None if on_text is None else partial(lambda base, i, piece: on_text(base + i, piece), p * body.n)
        choices += sample(engine.model, engine.chat_format, ids, opts, body.n, body.stop, emit, cancelled)
    return choices


async def respond(engine: Engine, body: Sampling, prompts: list[list[int]], param: str, chat: bool):
    options = [engine.options(body, len(ids), param) for ids in prompts]  # 400s before the queue
    cancelled = threading.Event()
    # With tools, calls in the template's syntax come back as tool_calls (a stream then sends each answer whole).
    style = engine.chat_format.tool_call_style if chat and getattr(body, "tools", None) else None
    if body.stream:
        return stream(engine, body, prompts, options, cancelled, chat, style)
    try:
        choices = await asyncio.wrap_future(engine.submit(
            partial(generate_all, engine, prompts, options, body, cancelled), cancelled))
    except BaseException:
        cancelled.set()
        raise
    if cancelled.is_set():
        raise ApiError(503, "the server is stopping", kind="server_error", code="server_busy")
    used = schema.usage(sum(map(len, prompts)), choices)
    if chat:
        return schema.chat_response(engine.name, choices, used, style)
    return schema.completion_response(engine.name, choices, used)


def stream(engine: Engine, body: Sampling, prompts, options, cancelled, chat: bool,
           style: str | CallSyntax | None = None) -> StreamingResponse:
    """Server-sent events fed from the generation thread through an asyncio queue; a client that leaves
    (Starlette cancels the response) sets `cancelled`, which stops generation at the next token."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def push(*item) -> None:
        loop.call_soon_threadsafe(events.put_nowait, item)

    def work() -> None:
        try:
            on_text = None if style else (lambda i, text: push("text", i, text))
            choices = generate_all(engine, prompts, options, body, cancelled, on_text)
            if cancelled.is_set():
                log.info("ftkit serve: stream cancelled (client gone or server stopping) after %d generated tokens",
                         sum(choice.tokens for choice in choices))
            push("done", choices)
        except Exception as err:  # reported in the stream: the 200 status is already sent
            push("error", err)

    engine.submit(work, cancelled)  # a full queue is a 503 before any byte of the stream
    used = partial(schema.usage, sum(map(len, prompts)))
    return StreamingResponse(sse(engine.name, body, len(prompts) * body.n, events, cancelled, used, chat, style),
                             media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def whole_answer(top: dict, index: int, choice, style: str | CallSyntax) -> dict:
    """One chunk with an answer's content, reasoning and tool calls (OpenAI numbers streamed tool calls)."""
    found = schema.chat_message(choice, style)
    delta = {k: v for k, v in found["message"].items() if k != "role" and v is not None}
    if "tool_calls" in delta:
        delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(delta["tool_calls"])]
    return schema.chat_chunk(top, index, delta, found["finish_reason"])


async def sse(model: str, body: Sampling, total: int, events: asyncio.Queue, cancelled, used, chat: bool,
              style: str | CallSyntax | None = None):
    top = schema.head("chat.completion.chunk" if chat else "text_completion", model)

    def chunk(index: int, text: str | None, finish: str | None = None) -> str:
        if chat:
            payload = schema.chat_chunk(top, index, {} if text is None else {"content": text}, finish)
        else:
            payload = schema.completion_chunk(top, index, text or "", finish)
        return data(payload)

    try:
        for index in range(total if chat else 0):
            yield data(schema.chat_chunk(top, index, {"role": "assistant", "content": ""}))
        while True:
            kind, *rest = await events.get()
            if kind == "text":
                yield chunk(*rest)
                continue
            if kind == "error":
                yield data(schema.error_body(f"{type(rest[0]).__name__}: {rest[0]}", "server_error"))
            else:
                for index, choice in enumerate(rest[0]):
                    yield data(whole_answer(top, index, choice, style)) if style else chunk(index, None,
                                                                                            choice.finish_reason)
                if body.include_usage():
                    yield data({**top, "choices": [], "usage": used(rest[0])})
            break
        yield "data: [DONE]\n\n"
    finally:
        cancelled.set()


def data(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads so that a taken port fails at once."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as err:
        raise FtkitError(f"cannot listen on {host}:{port} ({err.strerror or err}); choose another --port") from None
    return sock


def make_server(app: FastAPI, engine: Engine):
    """A uvicorn server with a deep listen backlog; Ctrl-C also stops the running generation."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            engine.close()
            super().handle_exit(sig, frame)

    return Server(uvicorn.Config(app, backlog=BACKLOG, log_level="info", timeout_graceful_shutdown=5,
                                 lifespan="off"))


def context_window(model) -> int | None:
    config = model.config
    return next((getattr(config, key) for key in ("max_position_embeddings", "n_positions", "seq_length")
                 if isinstance(getattr(config, key, None), int)), None)


def run_serve(adapter: Path | None, model_dir: Path | None, base: str | None, options: GenerationOptions,
              host: str = "127.0.0.1", port: int = 8000, queue_size: int = 8, name: str | None = None,
              dtype: str | None = None, trust_remote_code: bool = False, api_key: str | None = None,
              template_kwargs: str | None = None) -> None:
    from ftkit.inference.loading import load_for_chat, parse_template_kwargs, quiet_loading

    options.check()
    kwargs = parse_template_kwargs(template_kwargs)
    if queue_size < 0:
        raise FtkitError("--queue-size must be 0 or more")
    if not 0 <= port <= 65535:
        raise FtkitError(f"--port must be in 0..65535 (0: any free port), got {port}")
    sock = bind(host, port)
    quiet_loading()
    model, _, chat_format = load_for_chat(adapter, model_dir, base, dtype, trust_remote_code, kwargs)
    engine = Engine(model, chat_format, name or Path(adapter or model_dir).resolve().name, options, queue_size,
                    context_window(model))
    server = make_server(create_app(engine, api_key), engine)
    sock.listen(BACKLOG)  # from here a client that read the URL below waits in the backlog, never refused
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    line, note = production_line(adapter, model_dir, base, engine.name)
    print(f"ftkit serve: model '{engine.name}' on http://{shown}:{bound_port}/v1 (POST /v1/chat/completions, "
          f"/v1/completions; GET /v1/models, /health){'; API key required' if api_key else ''}; Ctrl-C stops\n"
          f"ftkit serve: in production: {line}" + (f"\nftkit serve: note: {note}" if note else ""), flush=True)
    server.run(sockets=[sock])
