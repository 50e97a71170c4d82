"""Generation with a run's stop tokens: one prompt (optionally streamed), many in a left-padded batch, or n
samples of one tokenised prompt cut at OpenAI-style stop strings (the server's path)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from ftkit.inference.options import GenerationOptions


def stop_ids(chat_format) -> list[int]:
    tokenizer = chat_format.tokenizer
    return [tokenizer.convert_tokens_to_ids(s) for s in chat_format.stop_strings()]


def generation_kwargs(chat_format, options: GenerationOptions) -> dict:
    """model.generate() arguments: stop at the template's end-of-turn (and eos); temperature 0 is greedy."""
    stops = stop_ids(chat_format)
    pad = chat_format.tokenizer.pad_token_id
    greedy = options.greedy or options.temperature <= 0
    kwargs = dict(max_new_tokens=options.max_new_tokens, do_sample=not greedy, eos_token_id=stops,
                  pad_token_id=pad if pad is not None else stops[0], repetition_penalty=options.repetition_penalty)
    if options.no_repeat_ngram_size:
        kwargs["no_repeat_ngram_size"] = options.no_repeat_ngram_size
    if options.min_new_tokens:
        kwargs["min_new_tokens"] = options.min_new_tokens
    if greedy:  # override sampling values a generation_config may carry, so transformers does not warn
        kwargs.update(temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(temperature=options.temperature, top_p=options.top_p, top_k=options.top_k)
    return kwargs


def generate_ids(model, chat_format, messages: list[dict], options: GenerationOptions, streamer=None,
                 stopping_criteria=None, tools: list | None = None, kwargs: dict | None = None) -> tuple[int, list[int]]:
    """-> (prompt token count, generated token ids including the stop token if one was reached). `tools` and
    `kwargs` (chat_template_kwargs) go to the chat template."""
    import torch

    tokenizer = chat_format.tokenizer
    prompt = chat_format.prompt(messages, tools, kwargs)
    inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(model.device)
    if options.seed is not None:
        torch.manual_seed(options.seed)
    with torch.no_grad():
        output = model.generate(**inputs, streamer=streamer, stopping_criteria=stopping_criteria,
                                **generation_kwargs(chat_format, options))
    start = inputs["input_ids"].shape[1]
    return start, output[0, start:].tolist()


def generate(model, chat_format, messages: list[dict], options: GenerationOptions, streamer=None,
             tools: list | None = None, kwargs: dict | None = None) -> str:
    _, ids = generate_ids(model, chat_format, messages, options, streamer, tools=tools, kwargs=kwargs)
    return chat_format.tokenizer.decode(ids, skip_special_tokens=True)


def generate_batch(model, chat_format, conversations: list[list[dict]], options: GenerationOptions,
                   tools: list | None = None, kwargs: list | None = None) -> list[str]:
    """Answers for many conversations in one left-padded batch; same prompts and stops as generate(). `tools` and
    `kwargs`: one entry (or None) per conversation."""
    import torch

    tokenizer = chat_format.tokenizer
    tools, kwargs = tools or [None] * len(conversations), kwargs or [None] * len(conversations)
    prompts = [chat_format.prompt(m, t, k) for m, t, k in zip(conversations, tools, kwargs)]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the last position of every row
    try:
        kwargs = generation_kwargs(chat_format, options)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token_id = kwargs["pad_token_id"]
        inputs = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt").to(model.device)
    finally:
        tokenizer.padding_side = side
    if options.seed is not None:
        torch.manual_seed(options.seed)
    with torch.no_grad():
        output = model.generate(**inputs, **kwargs)
    start = inputs["input_ids"].shape[1]
    return [tokenizer.decode(row[start:], skip_special_tokens=True) for row in output.tolist()]


def char_streamer(tokenizer, on_text):
    """A transformers TextStreamer that hands `on_text` each newly decoded piece as soon as it forms whole
    characters (a byte-level token that ends mid-character is held back), not whole words."""
    from transformers import TextStreamer

    class CharStreamer(TextStreamer):
        def put(self, value):
            if len(value.shape) > 1:
                value = value[0]
            if self.skip_prompt and self.next_tokens_are_prompt:
                self.next_tokens_are_prompt = False
                return
            self.token_cache.extend(value.tolist())
            text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs).rstrip("\ufffd")
            if len(text) > self.print_len:
                self.on_finalized_text(text[self.print_len:])
                self.print_len = len(text)

        def on_finalized_text(self, text: str, stream_end: bool = False):
            if text:
                on_text(text)

    return CharStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


@dataclass
class Choice:
    text: str
    tokens: int  # generated tokens, the end-of-turn token included
    finish_reason: str  # "stop": end of turn, eos or a stop string; "length": max_new_tokens reached


def prompt_ids(chat_format, messages: list[dict], tools: list[dict] | None = None,
               kwargs: dict | None = None) -> list[int]:
    """The token ids generate_ids would feed the model for `messages` (`tools`, `kwargs` go to the chat template)."""
    return chat_format.tokenizer(chat_format.prompt(messages, tools, kwargs), add_special_tokens=False)["input_ids"]


def first_stop(text: str, stops) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


class StopFilter:
    """Passes streamed text on up to the first stop string; holds back a tail that may begin one."""

    def __init__(self, stops, emit):
        self.stops, self.emit, self.held, self.stopped = list(stops), emit, "", False

    def feed(self, piece: str) -> None:
        if self.stopped:
            return
        text = self.held + piece
        cut = first_stop(text, self.stops)
        if cut is not None:
            self.stopped, self.held = True, ""
            self._send(text[:cut])
            return
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        self._send(text[:len(text) - keep])

    def close(self) -> None:
        if not self.stopped:
            self._send(self.held)
        self.held = ""

    def _send(self, text: str) -> None:
        if text:
            self.emit(text)


def flag_criterion(event):
    """A StoppingCriteria that ends every row once `event` (a threading.Event) is set."""
    import torch
    from transformers import StoppingCriteria

    class Flag(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device)

    return Flag()


def sample(model, chat_format, ids: list[int], options: GenerationOptions, n: int = 1, stop=(), on_text=None,
           cancelled=None) -> list[Choice]:
    """n answers to one tokenised prompt, each cut before the first of the `stop` strings.

    Without `on_text` the n answers come from one batch of n identical rows (greedy gives n equal answers);
    with `on_text(index, piece)` they are streamed one after another, since transformers' streamers take one
    row. Setting `cancelled` (a threading.Event) ends generation at the next token: the client left.
    """
    import torch

    if options.seed is not None:
        torch.manual_seed(options.seed)
    if on_text is None:
        return _sample_rows(model, chat_format, ids, options, n, stop, cancelled)
    choices = []
    for index in range(n):
        if cancelled is not None and cancelled.is_set():
            break
        text = StopFilter(stop, partial(on_text, index))
        streamer = char_streamer(chat_format.tokenizer, text.feed)
        choices += _sample_rows(model, chat_format, ids, options, 1, stop, cancelled, streamer)
        text.close()
    return choices


def _sample_rows(model, chat_format, ids, options, n, stop, cancelled, streamer=None) -> list[Choice]:
    import torch
    from transformers import StoppingCriteriaList, StopStringCriteria

    tokenizer = chat_format.tokenizer
    kwargs = generation_kwargs(chat_format, options)
    criteria = StoppingCriteriaList()
    if stop:
        criteria.append(StopStringCriteria(tokenizer, list(stop)))
    if cancelled is not None:
        criteria.append(flag_criterion(cancelled))
    input_ids = torch.tensor([ids] * n, device=model.device)
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer,
                                stopping_criteria=criteria, **kwargs)
    ends, pad = set(kwargs["eos_token_id"]), kwargs["pad_token_id"]
    return [_choice(tokenizer, row, ends, pad, stop, options.max_new_tokens)
            for row in output[:, len(ids):].tolist()]


def _choice(tokenizer, row: list[int], ends: set, pad: int, stop, limit: int) -> Choice:
    end = next((i + 1 for i, token in enumerate(row) if token in ends), None)
    if end is not None:
        row = row[:end]
    else:  # a row that stopped (stop string, cancel) before the others is padded to their length
        while row and row[-1] == pad:
            row = row[:-1]
    text = tokenizer.decode(row, skip_special_tokens=True)
    cut = first_stop(text, stop)
    if cut is not None:
        return Choice(text[:cut], len(row), "stop")
    return Choice(text, len(row), "stop" if end is not None or len(row) < limit else "length")
