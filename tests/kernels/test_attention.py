"""The decode attention kernel against PyTorch's SDPA, and the model's decode steps on it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from openglm import Config, GLMForCausalLM, kernels

pytestmark = pytest.mark.skipif(not kernels.cpp_operators_available(), reason="needs a C++ compiler and torch headers")


@pytest.mark.parametrize("B,H,KH,S,D", [(1, 12, 2, 96, 64), (3, 4, 4, 7, 20), (2, 8, 2, 300, 128), (1, 2, 1, 1, 8),
                                        (2, 32, 8, 2000, 128)])
@pytest.mark.parametrize("masked", ["none", "rows", "shared"])
def test_matches_sdpa(B, H, KH, S, D, masked):
    gen = torch.Generator().manual_seed(S)
    q = torch.randn(B, H, 1, D, generator=gen) * 4  # large scores: the softmax's max subtraction matters
    k, v = torch.randn(2, B, KH, S, D, generator=gen)
    mask = None
    if masked != "none":
        mask = torch.rand(B if masked == "rows" else 1, 1, 1, S, generator=gen) > 0.4
        mask[..., 0] = True  # every row sees a key
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    got = kernels.decode_attention(q, k, v, mask, D ** -0.5)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert (got - want).abs().max() < 1e-5


def test_strided_cache_views_and_a_row_that_sees_nothing():
    gen = torch.Generator().manual_seed(0)
    cache = torch.randn(3, 2, 2, 50, 16, generator=gen)  # [layers, B, KH, max_length, D], as a KV cache
    k, v = cache[1, :, :, :33], cache[2, :, :, :33]  # views: strides of the full buffer
    q = torch.randn(2, 6, 16, generator=gen).view(2, 1, 6, 16).transpose(1, 2)  # [B, H, 1, D], heads strided
    mask = torch.ones(2, 1, 1, 33, dtype=torch.bool)
    mask[1] = False
    got = kernels.decode_attention(q, k, v, mask, 0.25)
    want = F.scaled_dot_product_attention(q[:1], k[:1], v[:1], scale=0.25, enable_gqa=True)
    assert (got[:1] - want).abs().max() < 1e-5
    assert torch.equal(got[1], torch.zeros_like(got[1]))  # no visible key: zeros, not NaN


@pytest.mark.parametrize("compile", [False, True])
def test_model_decode_steps_use_it_and_match_sdpa(compile, monkeypatch):
    from openglm.data.tokenizer import load_tokenizer
    from openglm.infer.generate import generate_steps
    from openglm.infer.sampling import SamplingParams

    model = GLMForCausalLM.from_config(Config.from_name("glm-tiny-debug"), seed=0).eval()
    tokenizer = load_tokenizer("glm-tiny")
    params = SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=[-1])
    prompts = [list(range(5, 17)), list(range(40, 45))]  # padded rows: masks differ per row

    def tokens_of_run():
        torch._dynamo.reset()
        with torch.profiler.profile() as prof:
            tokens = [(s.row, s.token) for s in generate_steps(model, tokenizer, prompts, params, compile=compile)]
        return tokens, sum(e.count for e in prof.key_averages() if e.key == "openglm::decode_attention")

    ours, calls = tokens_of_run()
    assert calls >= 11 * model.config.num_layers  # every decode step, every layer
    monkeypatch.setattr(kernels, "cpp_operators_available", lambda: False)
    assert tokens_of_run() == (ours, 0)
