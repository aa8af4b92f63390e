"""The static KV cache (fixed shapes for a compiled decode step) gives the logits of the growing one."""

from __future__ import annotations

import pytest
import torch

from openglm import Config, GLMForCausalLM
from openglm.model.kv_cache import StaticKVCache


@pytest.mark.parametrize("name", ["glm-tiny-debug", "glm-tiny-2d-debug"])
def test_static_cache_steps_match_the_plain_cache(name):
    model = GLMForCausalLM.from_config(Config.from_name(name, post_norms=True), seed=2).eval()
    B, P, N = 2, 5, 4
    total = P + N
    ids = torch.randint(0, model.config.vocab_size, (B, P + N), generator=torch.Generator().manual_seed(0))
    plain, static = model.new_cache(B, total), model.new_cache(B, total, static=True)
    assert isinstance(static, StaticKVCache) and not isinstance(plain, StaticKVCache)
    seen = torch.zeros(B, total, dtype=torch.bool)  # cache slots written so far
    seen[:, :P] = True
    with torch.no_grad():
        want = model(ids[:, :P], cache=plain)
        static.slots = torch.arange(P)
        got = model(ids[:, :P], attention_mask=seen, cache=static)
        assert static.length == plain.length == P
        assert (want - got).abs().max() < 1e-5
        static.slots = torch.zeros(1, dtype=torch.long)
        for t in range(P, P + N):
            want = model(ids[:, t:t + 1], cache=plain)[:, -1]
            seen[:, t] = True
            static.slots.fill_(t)
            pos = model.positions(B, 1, t, ids.device)
            got = model.lm_head(model.model(ids[:, t:t + 1], pos, seen[:, None, None], static)[:, -1])
            static.length += 1
            assert (want - got).abs().max() < 1e-5
