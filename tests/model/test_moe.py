"""The MoE block's expert compute and the MoE configs (parity with transformers is in test_moe_parity.py)."""

from __future__ import annotations

import pytest
import torch

from openglm import Config, GLMForCausalLM
from openglm.config import CONFIGS
from openglm.model.glm import MoE, _grouped_mm_fits, expert_products


def moe_block(seed=0, **overrides) -> MoE:
    config = Config.from_name("glm-4.5-debug", num_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, **overrides)
    model = GLMForCausalLM.from_config(config, seed=seed)
    block = model.model.layers[1].mlp
    with torch.no_grad():
        block.gate.weight.normal_(0, 0.5)
        block.gate.e_score_correction_bias.normal_(0, 0.1)
    return block


def test_grouped_matmul_and_expert_loop_agree():
    torch.manual_seed(0)
    w = torch.randn(6, 32, 16)
    counts = torch.tensor([3, 0, 5, 1, 0, 7])
    x = torch.randn(int(counts.sum()), 16)
    with torch.no_grad():
        assert _grouped_mm_fits(x, w)
        grouped = expert_products(x, w, counts)
    x.requires_grad_()  # autograd takes the loop
    assert not _grouped_mm_fits(x, w)
    looped = expert_products(x, w, counts)
    starts = [0, 3, 3, 8, 9, 9]
    expected = torch.cat([x[s:s + n] @ w[e].T for e, (s, n) in enumerate(zip(starts, counts.tolist()))])
    assert torch.allclose(grouped, expected, atol=1e-5) and torch.allclose(looped, expected, atol=1e-5)


@pytest.mark.parametrize("moe_intermediate_size", [32, 21], ids=["grouped", "loop"])
def test_decode_reads_only_the_chosen_experts(moe_intermediate_size):
    """Experts no token chose hold NaN: the output stays finite and unchanged, so they were never read."""
    block = moe_block(moe_intermediate_size=moe_intermediate_size)
    x = torch.randn(1, 1, 64)  # one decode token
    with torch.no_grad():
        _, chosen = block.gate(x.view(1, 64))
        before = block(x)
        unused = torch.ones(16, dtype=torch.bool)
        unused[chosen.flatten()] = False
        block.experts.gate_up_proj[unused] = float("nan")
        block.experts.down_proj[unused] = float("nan")
        after = block(x)
    assert unused.sum() == 12
    assert torch.isfinite(after).all() and torch.equal(before, after)


def test_a_batch_gives_each_token_what_it_gets_alone():
    block = moe_block(seed=1)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        batch = block(x)
        alone = torch.cat([block(x[b:b + 1, t:t + 1]) for b in range(3) for t in range(5)]).view(3, 5, 64)
    assert torch.allclose(batch, alone, atol=1e-5)


def test_gradients_reach_only_the_chosen_experts():
    block = moe_block(seed=2, moe_intermediate_size=24)
    x = torch.randn(1, 2, 64, requires_grad=True)
    block(x).pow(2).sum().backward()
    _, chosen = block.gate(x.detach().view(2, 64))
    touched = block.experts.gate_up_proj.grad.flatten(1).abs().sum(1) > 0
    expected = torch.zeros(16, dtype=torch.bool)
    expected[chosen.flatten()] = True
    assert torch.equal(touched, expected)
    assert x.grad.abs().sum() > 0 and block.gate.weight.grad.abs().sum() > 0  # the weights are differentiable


# -- configs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name, total, active", [("glm-4.5", 355e9, 32e9), ("glm-4.5-air", 106e9, 12e9),
                                                 ("glm-4.6", 355e9, 32e9), ("glm-4.7", 355e9, 32e9)])
def test_published_moe_shapes(name, total, active):
    """Total and active counts as Zhipu states them (they include the MTP layer; active excludes embeddings)."""
    c = Config.from_name(name)
    assert c.model_type == "glm4_moe" and c.num_experts_per_tok == 8 and c.num_shared_experts == 1
    embed = 2 * c.vocab_size * c.hidden_size
    assert abs(c.num_parameters - total) / total < 0.03
    assert abs(c.num_active_parameters - embed - active) / active < 0.03


def test_moe_parameter_count_matches_the_module():
    for name in ("glm-4.5-debug", "glm-4.5-air-debug"):
        c = Config.from_name(name)
        model = GLMForCausalLM.from_config(c, device="meta")
        assert sum(p.numel() for p in model.parameters()) == c.num_parameters
        assert c.num_active_parameters == c.num_parameters - c.num_moe_layers * 6 * 3 * 64 * 32


def test_moe_debug_siblings_keep_the_architecture():
    for name in ("glm-4.5", "glm-4.5-air", "glm-4.6", "glm-4.7"):
        full, debug = CONFIGS[name], CONFIGS[f"{name}-debug"]
        assert debug.num_experts == 8 and debug.num_moe_layers == 1
        assert (debug.use_qk_norm, debug.routed_scaling_factor) == (full.use_qk_norm, full.routed_scaling_factor)


@pytest.mark.parametrize("overrides, message", [
    (dict(n_group=3), "split into n_group=3 groups"),
    (dict(n_group=2, topk_group=3), "topk_group=3 must be between 1 and n_group=2"),
    (dict(n_group=4, topk_group=1, num_experts_per_tok=3), "must be between 1 and the 2 experts"),
    (dict(post_norms=True), "neither post_norms"),
])
def test_invalid_moe_configs_are_refused(overrides, message):
    from openglm import OpenGLMError

    with pytest.raises(OpenGLMError, match=message):
        Config.from_name("glm-4.5-debug", **overrides)
    with pytest.raises(OpenGLMError, match="use_qk_norm exists only"):
        Config.from_name("glm-tiny-debug", use_qk_norm=True)


def test_info_shows_total_and_active_parameters():
    import re
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "openglm", "info", "glm-4.5-air"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in r.stdout.splitlines()[:10])
    assert lines["model type"] == "glm4_moe"
    assert lines["experts"] == "128 routed (8 per token) + 1 shared, in 45 of 46 layers"
    assert lines["active parameters"].startswith("13,424,123,904 per token")
    assert lines["weights bf16"] == "203,804.5 MiB (24,420.5 MiB read per decoded token)"
    assert lines["KV cache bf16"] == "184.0 KiB per token"


@pytest.mark.slow
@pytest.mark.parametrize("scheme", [None, "int8"])
def test_compiled_decode_gives_the_eager_tokens(scheme):
    """The compiled decode step (one static graph: each slot gathers its expert's weights) decodes like eager."""
    from openglm import SamplingParams
    from openglm.data.tokenizer import Tokenizer
    from openglm.infer.generate import generate_steps
    from openglm.quant import quantize_model
    from tokenizers import Tokenizer as HFTokenizer, models

    config = Config.from_name("glm-4.5-air-debug", eos_token_id=[0], pad_token_id=0, n_group=2, topk_group=1)
    model = GLMForCausalLM.from_config(config, seed=0).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(10)
        model.lm_head.weight[0] = 0  # never end early
    if scheme:
        quantize_model(model, scheme)
    tok = Tokenizer(HFTokenizer(models.WordLevel({f"t{i}": i for i in range(config.vocab_size)}, unk_token="t0")))
    params = SamplingParams(max_new_tokens=8, temperature=0)
    prompts = [[5, 6, 7], [9, 3]]
    with torch.inference_mode():
        eager = [s.token for s in generate_steps(model, tok, prompts, params)]
        compiled = [s.token for s in generate_steps(model, tok, prompts, params, compile=True)]
    assert compiled == eager
