"""Chat generation shared by ``openglm chat`` and the server: a conversation in, the assistant's reply out."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from ..data.chat import chat_template_of, end_of_turn_ids, render_prompt
from .generate import generate_steps
from .sampling import SamplingParams


def chat_prompt(tokenizer, messages: list[dict], tools: list[dict] | None = None,
                template: str | None = None) -> list[int]:
    """Token ids of ``messages`` followed by the ``<|assistant|>`` generation prompt."""
    return render_prompt(tokenizer, messages, tools, template=template or chat_template_of(tokenizer))


def chat_stream(model, tokenizer, messages: list[dict], tools: list[dict] | None = None,
                params: SamplingParams | None = None, template: str | None = None) -> Iterator[str]:
    """Text deltas of the assistant's reply to OpenAI-style ``messages``.

    Generation stops on ``end_of_turn_ids`` (plus ``params``' own stops). The newline GLM-4 writes
    before a plain reply is dropped; a tool call comes out as GLM-4 writes it, ``{name}\\n{json}``,
    so ``parse_assistant("".join(deltas), tools)`` gives the OpenAI-style message. ``template`` is
    Jinja source (default: the tokenizer's ``chat_template`` attribute, else GLM-4's).
    """
    params = params or SamplingParams()
    if not params.max_new_tokens:
        return
    params = dataclasses.replace(params, stop_token_ids=[*params.stop_token_ids, *end_of_turn_ids(tokenizer)])
    prompt = chat_prompt(tokenizer, messages, tools, template)
    started = False
    for step in generate_steps(model, tokenizer, [prompt], params):
        text = step.text
        if not started and text:
            started = True
            text = text.removeprefix("\n")
        if text:
            yield text
