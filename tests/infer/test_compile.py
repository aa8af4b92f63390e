"""The compiled decode step (static cache, one graph for every step) picks the tokens eager decoding picks."""

from __future__ import annotations

import pytest
import torch

from openglm import SamplingParams, load_model
from openglm.infer.generate import generate_steps


@pytest.mark.slow
def test_compiled_decode_gives_the_eager_greedy_tokens(tiny_checkpoint, tokenizer):
    torch._dynamo.reset()
    model = load_model(tiny_checkpoint)
    prompts = [tokenizer.encode("The General Language Model"), tokenizer.encode("通用")]  # left-padded batch
    params = SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=[])
    eager = [(s.row, s.token, s.text) for s in generate_steps(model, tokenizer, prompts, params)]
    compiled = [(s.row, s.token, s.text) for s in generate_steps(model, tokenizer, prompts, params, compile=True)]
    assert compiled == eager
    assert len(eager) > 2


@pytest.mark.slow
def test_each_model_gets_its_own_compiled_step(tiny_checkpoint, tokenizer):
    # The step is compiled with the weights as constants: a second model, same shapes, different
    # weights, must not run the first one's graph.
    torch._dynamo.reset()
    first = load_model(tiny_checkpoint)
    second = load_model(tiny_checkpoint)
    with torch.no_grad():
        for p in second.parameters():
            p.mul_(-1.5)
    prompt = [tokenizer.encode("The General Language Model")]
    params = SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=[])
    for model in (first, second):
        eager = [s.token for s in generate_steps(model, tokenizer, prompt, params)]
        assert [s.token for s in generate_steps(model, tokenizer, prompt, params, compile=True)] == eager


@pytest.mark.slow
def test_later_generations_with_new_caches_and_batch_sizes(tiny_checkpoint, tokenizer):
    # Each generation brings a new static cache (and its slot tensor): the compiled step must use
    # those, not the first generation's.
    torch._dynamo.reset()
    model = load_model(tiny_checkpoint)
    params = SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=[])
    for prompts in ([tokenizer.encode("Once upon a time")], [tokenizer.encode("通用"), tokenizer.encode("The model")],
                    [tokenizer.encode("A prime number is")]):
        eager = [(s.row, s.token) for s in generate_steps(model, tokenizer, prompts, params)]
        assert [(s.row, s.token) for s in generate_steps(model, tokenizer, prompts, params, compile=True)] == eager
