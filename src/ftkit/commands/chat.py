"""`ftkit chat`: one-shot (--prompt), line by line from piped stdin, or an interactive REPL with streamed
tokens and slash commands. Loading and generation are the inference core's (ftkit.inference)."""

from __future__ import annotations

import sys

from ftkit.errors import FtkitError
from ftkit.files import check_arg_text
from ftkit.inference.generate import char_streamer, generate
from ftkit.inference.loading import default_system, load_for_chat, quiet_loading
from ftkit.inference.options import GenerationOptions


HELP = ("commands: /reset (clear the history), /system TEXT (new system prompt; /system alone removes it), "
        "/set NAME=VALUE (e.g. /set temperature=0.5), /params, /help, /exit")


def run_chat(adapter, model_dir, base, prompt, system, options: GenerationOptions, dtype=None,
             stream: bool = True, trust_remote_code: bool = False) -> None:
    options.check()
    check_arg_text(prompt, "--prompt")
    check_arg_text(system, "--system")
    quiet_loading()
    model, _, chat_format = load_for_chat(adapter, model_dir, base, dtype, trust_remote_code)
    system = default_system(adapter or model_dir, system)
    if prompt is not None:
        answer(model, chat_format, ([{"role": "system", "content": system}] if system else [])
               + [{"role": "user", "content": prompt}], options, stream)
        return
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"ftkit chat: type a message. {HELP}", file=sys.stderr)
    history: list[dict] = []
    for line in iter_input(interactive):
        try:
            check_arg_text(line, "that line")
        except FtkitError as err:
            note(f"{err}; not sent")
            continue
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            if command in ("/exit", "/quit"):
                break
            if command == "/reset":
                history = []
                note("history cleared")
            elif command == "/system":
                system = rest.strip() or None
                history = []
                note(f"system prompt {'set' if system else 'removed'}; history cleared")
            elif command == "/set":
                try:
                    options.set(rest)
                    note(options.describe())
                except FtkitError as err:
                    note(str(err))
            elif command == "/params":
                note(options.describe() + (f"\nsystem: {system}" if system else ""))
            elif command == "/help":
                note(HELP)
            else:
                note(f"unknown command {command}; {HELP}")
            continue
        messages = ([{"role": "system", "content": system}] if system else []) + history
        try:
            text = answer(model, chat_format, messages + [{"role": "user", "content": line}], options, stream)
        except KeyboardInterrupt:
            if not interactive:
                raise
            print(flush=True)
            note("(answer interrupted; that turn is not kept)")
            continue
        history += [{"role": "user", "content": line}, {"role": "assistant", "content": text}]


def answer(model, chat_format, messages, options, stream: bool) -> str:
    """Print the answer (streamed as it is generated) and a newline; return it."""
    if not stream:
        text = generate(model, chat_format, messages, options)
        print(text, flush=True)
        return text
    streamer = char_streamer(chat_format.tokenizer, lambda piece: print(piece, end="", flush=True))
    text = generate(model, chat_format, messages, options, streamer=streamer)
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
