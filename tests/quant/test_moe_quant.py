"""Quantized mixture-of-experts models: routed experts in INT8/INT4, the router in full precision."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from openglm import Config, GLMForCausalLM, load_model, save_model
from openglm.model.glm import Router
from openglm.quant import quantize_model
from openglm.quant.experts import QuantExperts


def moe_model(seed=0):
    config = Config.from_name("glm-4.5-debug", n_group=2, topk_group=1, eos_token_id=[1])
    model = GLMForCausalLM.from_config(config, seed=seed)
    with torch.no_grad():
        model.model.layers[1].mlp.gate.weight.normal_(0, 0.5)  # clear routing decisions
        model.model.layers[1].mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    return model.eval()


@pytest.mark.parametrize("scheme, group_size, symmetric, tol", [("int8", None, True, 0.02), ("int4", 32, True, 0.3),
                                                                ("int4", 32, False, 0.3)])
def test_experts_are_quantized_and_the_router_is_not(tmp_path, scheme, group_size, symmetric, tol):
    model = moe_model()
    ids = torch.randint(0, 512, (2, 15), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids)
    router = model.model.layers[1].mlp.gate.weight.detach().clone()
    quantize_model(model, scheme, group_size, symmetric)
    experts = model.model.layers[1].mlp.experts
    assert isinstance(experts, QuantExperts) and experts.gate_up_proj.dtype in (torch.int8, torch.uint8)
    assert "model.layers.1.mlp.experts" in model.quantization.modules
    gate = model.model.layers[1].mlp.gate
    assert isinstance(gate, Router) and torch.equal(gate.weight, router) and gate.weight.dtype == torch.float32
    with torch.no_grad():
        quantized = model(ids)
        prefill = model(torch.randint(0, 512, (1, 64)))  # enough rows per expert for the dequantizing path
    assert torch.isfinite(prefill).all()
    rel = ((quantized - reference).norm() / reference.norm()).item()
    assert rel < tol, rel
    save_model(model, tmp_path / "q")
    back = load_model(tmp_path / "q")
    assert isinstance(back.model.layers[1].mlp.experts, QuantExperts)
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    with torch.no_grad():
        assert torch.equal(back(ids), quantized)


@pytest.mark.parametrize("with_kernels", [True, False], ids=["kernels", "no-compiler"])
def test_quantized_experts_match_their_dequantized_weights(monkeypatch, with_kernels):
    """The integer products equal float products with the dequantized weights (decode and prefill rows)."""
    from openglm import kernels
    from openglm.quant.linear import dequantize

    if not with_kernels:  # as on a machine where the kernels cannot be built
        monkeypatch.setattr(kernels, "available", lambda: False)

    model = moe_model(seed=2)
    float_experts = model.model.layers[1].mlp.experts
    q = QuantExperts.from_experts(float_experts, 4, 32, True)
    with torch.no_grad():
        float_experts.gate_up_proj.copy_(torch.stack([dequantize(w, s, None, 4, 32) for w, s in
                                                       zip(q.gate_up_proj, q.gate_up_proj_scale)]))
        float_experts.down_proj.copy_(torch.stack([dequantize(w, s, None, 4, 32) for w, s in
                                                    zip(q.down_proj, q.down_proj_scale)]))
        for n in (1, 200):
            x = torch.randn(n, 64)
            weights, chosen = model.model.layers[1].mlp.gate(x)
            assert torch.allclose(q(x, weights, chosen), float_experts(x, weights, chosen), atol=2e-3, rtol=1e-3)


def test_quantize_cli_on_a_moe_checkpoint(tmp_path):
    save_model(moe_model(), tmp_path / "moe")
    r = subprocess.run([sys.executable, "-m", "openglm", "quantize", str(tmp_path / "moe"), "--scheme", "int8",
                        "-o", str(tmp_path / "moe-int8")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    model = load_model(tmp_path / "moe-int8")
    assert model.quantization.label == "int8" and isinstance(model.model.layers[1].mlp.experts, QuantExperts)
