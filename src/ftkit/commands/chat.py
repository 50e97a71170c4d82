"""`ftkit chat`: one-shot (--prompt), line by line from piped stdin, or an interactive REPL with streamed
tokens and slash commands. Loading and generation are the inference core's (ftkit.inference).

With --tools, the function schemas go to the chat template on every turn; a tool call the model writes (in the
template's syntax) is kept in the history as a call, and `/tool RESULT` answers it, so the model goes on."""

from __future__ import annotations

import json
import sys

from ftkit.errors import FtkitError
from ftkit.files import check_arg_text
from ftkit.inference.generate import char_streamer, generate
from ftkit.inference.loading import default_system, load_for_chat, quiet_loading
from ftkit.inference.options import GenerationOptions
from ftkit.inference.replies import history_message, parse_reply

HELP = ("commands: /reset (clear the history), /system TEXT (new system prompt; /system alone removes it), "
        "/tool RESULT (answer the model's tool call), /set NAME=VALUE (e.g. /set temperature=0.5), /params, /help, "
        "/exit")


class Session:
    """The model, its chat format, the tools and the history of one conversation."""

    def __init__(self, model, chat_format, options: GenerationOptions, system: str | None, tools: list | None,
                 stream: bool):
        self.model, self.chat_format, self.options = model, chat_format, options
        self.system, self.tools, self.stream = system, tools, stream
        self.history: list[dict] = []

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def send(self, message: dict) -> str:
        """Answer the history plus `message`, print it, and keep both (as a tool call when the answer is one)."""
        text = answer(self.model, self.chat_format, self.messages() + [message], self.options, self.stream,
                      self.tools)
        reply = parse_reply(text, self.chat_format.tool_call_style if self.tools else None)
        self.history += [message, history_message(reply)]
        for call in reply.tool_calls:
            note(f"(tool call {call['name']}({json.dumps(call['arguments'], ensure_ascii=False)}); answer it with "
                 "/tool RESULT)")
        return text

    def tool_result(self, text: str) -> None:
        """The result of the model's next unanswered tool call; the model answers once every call has one."""
        last = max((i for i, m in enumerate(self.history) if m["role"] == "assistant"), default=None)
        calls = self.history[last].get("tool_calls") if last is not None else None
        answered = len(self.history) - last - 1 if last is not None else 0
        if not calls or answered >= len(calls):
            note("no tool call to answer: /tool answers the model's last tool call")
            return
        call = calls[answered]
        message = {"role": "tool", "content": text, "name": call["function"]["name"], "tool_call_id": call["id"]}
        if answered + 1 < len(calls):
            self.history.append(message)
            note(f"(result kept; {len(calls) - answered - 1} more tool call(s) to answer)")
            return
        self.send(message)


def run_chat(adapter, model_dir, base, prompt, system, options: GenerationOptions, dtype=None,
             stream: bool = True, trust_remote_code: bool = False, tools_path=None, template_kwargs=None) -> None:
    from ftkit.inference.loading import parse_template_kwargs, read_tools

    options.check()
    check_arg_text(prompt, "--prompt")
    if prompt is not None and not prompt.strip():
        raise FtkitError("--prompt is empty: give the message to answer, or leave --prompt out for a conversation")
    check_arg_text(system, "--system")
    tools, kwargs = read_tools(tools_path), parse_template_kwargs(template_kwargs)
    quiet_loading()
    model, _, chat_format = load_for_chat(adapter, model_dir, base, dtype, trust_remote_code, kwargs)
    session = Session(model, chat_format, options, default_system(adapter or model_dir, system), tools, stream)
    if prompt is not None:
        session.send({"role": "user", "content": prompt})
        return
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"ftkit chat: type a message. {HELP}", file=sys.stderr)
    for line in iter_input(interactive):
        try:
            check_arg_text(line, "that line")
        except FtkitError as err:
            note(f"{err}; not sent")
            continue
        if line.startswith("/") and not line.startswith("/tool "):
            if not command(session, line):
                break
            continue
        try:
            if line.startswith("/tool "):
                session.tool_result(line[len("/tool "):].strip())
            else:
                session.send({"role": "user", "content": line})
        except KeyboardInterrupt:
            if not interactive:
                raise
            print(flush=True)
            note("(answer interrupted; that turn is not kept)")


def command(session: Session, line: str) -> bool:
    """A slash command; False to end the chat."""
    name, _, rest = line.partition(" ")
    if name in ("/exit", "/quit"):
        return False
    if name == "/reset":
        session.history = []
        note("history cleared")
    elif name == "/system":
        session.system = rest.strip() or None
        session.history = []
        note(f"system prompt {'set' if session.system else 'removed'}; history cleared")
    elif name == "/set":
        try:
            session.options.set(rest)
            note(session.options.describe())
        except FtkitError as err:
            note(str(err))
    elif name == "/params":
        note(session.options.describe() + (f"\nsystem: {session.system}" if session.system else ""))
    elif name == "/help":
        note(HELP)
    elif name == "/tool":
        note("usage: /tool RESULT (the result of the model's tool call)")
    else:
        note(f"unknown command {name}; {HELP}")
    return True


def answer(model, chat_format, messages, options, stream: bool, tools: list | None = None) -> str:
    """Print the answer (streamed as it is generated) and a newline; return it."""
    if not stream:
        text = generate(model, chat_format, messages, options, tools=tools)
        print(text, flush=True)
        return text
    streamer = char_streamer(chat_format.tokenizer, lambda piece: print(piece, end="", flush=True))
    text = generate(model, chat_format, messages, options, streamer=streamer, tools=tools)
    print(flush=True)
    return text


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def iter_input(interactive: bool):
    if not interactive and hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")  # a bad byte is reported per line, not a crash
    while True:
        try:
            line = input(">>> ") if interactive else sys.stdin.readline()
        except EOFError:
            return
        if not interactive and not line:
            return
        line = line.strip()
        if line:
            yield line
