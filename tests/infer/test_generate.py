"""Generation against plain full forwards: the cache, padding, sampling and infilling change nothing they should not."""

from __future__ import annotations

import pytest
import torch

import openglm
from openglm import OpenGLMError, SamplingParams, load_model
from openglm.infer.generate import generate_steps
from openglm.infer.sampling import filter_logits
from openglm.model.masks import prefix_lm_mask


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint)


def greedy_reference(model, ids, n):
    """Greedy decoding by full forwards with no cache: the slow, obviously right way."""
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
            ids.append(nxt)
            out.append(nxt)
    return out


def test_greedy_with_cache_equals_full_forwards(model, tokenizer):
    prompt = tokenizer.encode("The General Language Model")
    steps = list(generate_steps(model, tokenizer, [prompt], SamplingParams(max_new_tokens=12, temperature=0)))
    ref = greedy_reference(model, prompt, 12)
    got = [s.token for s in steps]
    assert got == ref[: len(got)]
    if len(got) < 12:  # stopped early on a stop token
        assert got[-1] in model.config.eos_token_id


def test_batch_of_different_lengths_equals_one_by_one(model, tokenizer):
    prompts = ["The General", "通用语言模型通过自回归", "Numbers like 2022 and 130 appear"]
    batched = openglm.generate(model, prompts, tokenizer=tokenizer, max_new_tokens=10, temperature=0)
    alone = [openglm.generate(model, p, tokenizer=tokenizer, max_new_tokens=10, temperature=0) for p in prompts]
    assert batched == alone
    assert any(batched)


def test_seed_makes_sampling_reproducible(model, tokenizer):
    kw = dict(tokenizer=tokenizer, max_new_tokens=16, temperature=1.0, top_p=0.9)
    a = openglm.generate(model, "It reads", seed=7, **kw)
    assert a == openglm.generate(model, "It reads", seed=7, **kw)
    others = {openglm.generate(model, "It reads", seed=s, **kw) for s in range(8, 14)}
    assert len(others | {a}) > 1


def test_top_k_one_is_greedy(model, tokenizer):
    kw = dict(tokenizer=tokenizer, max_new_tokens=10)
    assert openglm.generate(model, "blank", temperature=1.5, top_k=1, seed=0, **kw) == \
        openglm.generate(model, "blank", temperature=0, **kw)


def test_filter_logits_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = filter_logits(logits, top_k=0, top_p=0.8).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    kept = filter_logits(logits, top_k=0, top_p=0.81).isfinite()
    assert kept.tolist() == [[True, True, True, False]]
    assert filter_logits(logits, top_k=0, top_p=0.1).isfinite().sum() == 1


def test_repetition_penalty_changes_repeats(model, tokenizer):
    kw = dict(tokenizer=tokenizer, max_new_tokens=24, temperature=0)
    plain = openglm.generate(model, "a", **kw)
    penalised = openglm.generate(model, "a", repetition_penalty=5.0, **kw)
    ids = tokenizer.encode(penalised)
    assert penalised != plain
    assert len(set(ids)) >= len(set(tokenizer.encode(plain)))


def test_streaming_pieces_add_up_to_generate(model, tokenizer):
    kw = dict(tokenizer=tokenizer, max_new_tokens=20, temperature=0.9, seed=3)
    pieces = list(openglm.stream(model, "通用", **kw))
    assert "".join(pieces) == openglm.generate(model, "通用", **kw)
    assert len(pieces) > 1


def test_stop_string_cuts_the_text(model, tokenizer):
    full = openglm.generate(model, "The", tokenizer=tokenizer, max_new_tokens=20, temperature=0)
    assert len(full) > 4
    stop = full[2:4]
    cut = openglm.generate(model, "The", tokenizer=tokenizer, max_new_tokens=20, temperature=0, stop_strings=[stop])
    assert cut == full[: full.index(stop)]
    pieces = list(openglm.stream(model, "The", tokenizer=tokenizer, max_new_tokens=20, temperature=0, stop_strings=[stop]))
    assert "".join(pieces) == cut


def test_stop_token_ends_generation(model, tokenizer):
    stops = set(model.config.eos_token_id) | {tokenizer.eos_id}
    candidates = [tokenizer.encode(t) for t in ("The General", "Numbers", "通用", "It reads", "symbols", "(a + b)")]
    prompt, first = next((p, f) for p in candidates if not stops & set(f := greedy_reference(model, p, 3)))
    steps = list(generate_steps(
        model, tokenizer, [prompt], SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=[first[2]])))
    assert [s.token for s in steps] == first[:3]
    assert steps[-1].finish_reason == "stop"


def test_length_finish_reason(model, tokenizer):
    steps = list(generate_steps(
        model, tokenizer, [tokenizer.encode("x")], SamplingParams(max_new_tokens=3, temperature=0, stop_token_ids=[])))
    if len(steps) == 3:
        assert steps[-1].finish_reason == "length"


def test_too_long_request_is_refused(model, tokenizer):
    with pytest.raises(OpenGLMError, match="exceeds the model's"):
        openglm.generate(model, "x", tokenizer=tokenizer, max_new_tokens=5000)
    with pytest.raises(OpenGLMError, match="top_p"):
        openglm.generate(model, "x", tokenizer=tokenizer, top_p=0)


def test_model_by_path_brings_its_tokenizer(tiny_checkpoint):
    out = openglm.generate(str(tiny_checkpoint), "GLM", max_new_tokens=4, temperature=0)
    assert isinstance(out, str)


@pytest.mark.parametrize("two_d", [False, True], ids=["1d", "2d"])
def test_infill_equals_glm_part_b_decoding_without_cache(tokenizer, two_d):
    """The cached infill must pick the tokens a full forward over Part A + Part B would (prefix mask, span positions)."""
    name = "glm-tiny-2d-debug" if two_d else "glm-tiny-debug"
    config = openglm.Config.from_name(name, vocab_size=tokenizer.vocab_size, eos_token_id=[tokenizer.eos_id])
    model = openglm.GLMForCausalLM.from_config(config, seed=1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(10)
    text = "It reads [MASK] in both [MASK]."
    filled = openglm.infill(model, text, tokenizer=tokenizer, max_new_tokens=4, temperature=0)

    # Reference: Part A, then for each blank <sop> + span, positions (blank, 1..), one full forward per token.
    mask_id, sop, eop = (tokenizer.token_id(t) for t in ("[MASK]", "<sop>", "<eop>"))
    part_a = tokenizer.encode("It reads ") + [mask_id] + tokenizer.encode(" in both ") + [mask_id] + tokenizer.encode(".")
    blanks = [i for i, t in enumerate(part_a) if t == mask_id]
    ids, pos, block, spans = list(part_a), list(range(len(part_a))), [0] * len(part_a), []
    for b in blanks:
        ids.append(sop), pos.append(b), block.append(1)
        span = []
        while len(span) < 4:
            T = len(ids)
            p, k = torch.tensor([pos]), torch.tensor([block])
            positions = torch.stack((p, k), 1) if two_d else p + k
            with torch.no_grad():
                logits = model(torch.tensor([ids]), positions, prefix_lm_mask(len(part_a), T)[None])
            nxt = int(logits[0, -1].argmax())
            if nxt in (eop, tokenizer.eos_id):
                break
            span.append(nxt)
            ids.append(nxt), pos.append(b), block.append(len(span) + 1)
        spans.append(tokenizer.decode(span))
    assert filled == f"It reads {spans[0]} in both {spans[1]}."


def test_infill_needs_a_blank(model, tokenizer):
    with pytest.raises(OpenGLMError, match="no blank"):
        openglm.infill(model, "nothing to fill", tokenizer=tokenizer)
