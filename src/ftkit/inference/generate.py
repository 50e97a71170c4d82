"""Generation with a run's stop tokens: one prompt (optionally streamed), or many in a left-padded batch."""

from __future__ import annotations

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
    if greedy:  # override sampling values a generation_config may carry, so transformers does not warn
        kwargs.update(temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(temperature=options.temperature, top_p=options.top_p, top_k=options.top_k)
    return kwargs


def generate_ids(model, chat_format, messages: list[dict], options: GenerationOptions, streamer=None,
                 stopping_criteria=None) -> tuple[int, list[int]]:
    """-> (prompt token count, generated token ids including the stop token if one was reached)."""
    import torch

    tokenizer = chat_format.tokenizer
    prompt = chat_format.prompt(messages)
    inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(model.device)
    if options.seed is not None:
        torch.manual_seed(options.seed)
    with torch.no_grad():
        output = model.generate(**inputs, streamer=streamer, stopping_criteria=stopping_criteria,
                                **generation_kwargs(chat_format, options))
    start = inputs["input_ids"].shape[1]
    return start, output[0, start:].tolist()


def generate(model, chat_format, messages: list[dict], options: GenerationOptions, streamer=None) -> str:
    _, ids = generate_ids(model, chat_format, messages, options, streamer)
    return chat_format.tokenizer.decode(ids, skip_special_tokens=True)


def generate_batch(model, chat_format, conversations: list[list[dict]], options: GenerationOptions) -> list[str]:
    """Answers for many conversations in one left-padded batch; same prompts and stops as generate()."""
    import torch

    tokenizer = chat_format.tokenizer
    prompts = [chat_format.prompt(messages) for messages in conversations]
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
