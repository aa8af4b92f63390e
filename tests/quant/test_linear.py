"""Quantized modules: the portable format, both CPU kernel paths, and exact state-dict round trips."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from openglm.errors import OpenGLMError
from openglm import kernels
from openglm.quant.linear import (QuantEmbedding, QuantLinear, dequantize, pack_nibbles, quantize_int4, quantize_int8,
                                  unpack_nibbles)


@pytest.fixture(params=["ours", "torch"])
def path(request, monkeypatch):
    """Run a test on our compiled kernels and on PyTorch's (what runs where no compiler is found)."""
    if request.param == "ours":
        assert kernels.available(), "the C++ kernels must build where the tests run"
    else:
        monkeypatch.setitem(kernels._state, "lib", None)
    return request.param


def _linear(n=48, k=64, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.normal_()
    return lin


def test_nibbles_round_trip_and_order():
    q = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    packed = pack_nibbles(q)
    assert packed.tolist() == [[1 | 2 << 4, 15]]  # even column in the low nibble
    assert torch.equal(unpack_nibbles(packed), q)


def test_int8_per_channel_error_bound():
    w = torch.randn(16, 64)
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (16,) and scale.dtype == torch.bfloat16
    err = (dequantize(q, scale, None, 8, None) - w).abs()
    assert (err <= scale.float()[:, None] / 2 + 1e-6).all()  # at most half a step per row


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("seed", range(5))
def test_int4_groups_error_bound(symmetric, seed):
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(seed))
    q, scale, zero = quantize_int4(w, 32, symmetric)
    assert q.shape == (16, 32) and scale.shape == (16, 2) and (zero is None) == symmetric
    deq = dequantize(q, scale, zero, 4, 32)
    step = scale.float().abs().repeat_interleave(32, dim=1)
    # half a step, except that q4_0-style symmetric groups clip the side opposite the extreme at +7
    # steps (up to one step off), and the grids are bf16-rounded steps long (each off by up to 2^-8)
    assert ((deq - w).abs() <= step * (1 + 8 / 256 if symmetric else 0.5 + 15 / 256) + 1e-5).all()
    if symmetric:  # q4_0 style: the largest magnitude of each group is exact (level -8)
        g = w.view(16, 2, 32)
        extreme = g.gather(-1, g.abs().argmax(-1, keepdim=True))
        assert torch.allclose(deq.view(16, 2, 32).gather(-1, g.abs().argmax(-1, keepdim=True)), extreme, rtol=1e-2)


@pytest.mark.parametrize("bits,group,symmetric", [(8, None, True), (4, 32, True), (4, 32, False), (4, 64, True)])
def test_quant_linear_matches_dequantized_weights(bits, group, symmetric, path):
    lin = _linear()
    ql = QuantLinear.from_linear(lin, bits, group, symmetric)
    assert ql.use_kernels == (path == "ours")
    state = ql.state_dict()
    w = dequantize(state["weight"], state["weight_scale"], state.get("weight_zero"), bits, group)
    x = torch.randn(3, 5, 64)
    y = ql(x)
    assert y.shape == (3, 5, 48) and y.dtype == torch.float32
    if path == "ours":  # float32 activations (int16 per group for INT4): the dequantized product
        assert torch.allclose(y, x @ w.t() + lin.bias, atol=1e-3, rtol=1e-4)
    else:  # bf16 activations
        assert torch.allclose(y, x.bfloat16().float() @ w.t() + lin.bias, atol=0.15, rtol=0.02)
    # and close to the float layer
    rel = (y - lin(x)).norm() / lin(x).norm()
    assert rel < (0.02 if bits == 8 else 0.15)


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_state_dict_is_the_portable_form_exactly(symmetric, path):
    lin = _linear()
    q, scale, zero = quantize_int4(lin.weight.detach(), 32, symmetric)
    ql = QuantLinear.from_linear(lin, 4, 32, symmetric)
    if path == "torch":
        assert ql.packed and ql.weight_scale is None  # runtime holds only PyTorch's kernel layout
    else:
        assert not ql.packed and ql.weight.shape == (48, 32)  # ours runs on the portable form
    state = ql.state_dict()
    assert torch.equal(state["weight"], q) and torch.equal(state["weight_scale"], scale)
    if not symmetric:
        assert torch.equal(state["weight_zero"], zero)
    # loading into an already packed module repacks and computes the same
    other = QuantLinear.from_linear(_linear(seed=1), 4, 32, symmetric)
    other.load_state_dict(state)
    x = torch.randn(2, 64)
    assert torch.equal(other(x), ql(x))


def test_meta_build_then_assign_load(path):
    ql = QuantLinear.from_linear(_linear(), 4, 32, True)
    state = ql.state_dict()
    with torch.device("meta"):
        empty = QuantLinear(64, 48, True, 4, 32, True)
    assert {k: v.shape for k, v in empty.state_dict().items()} == {k: v.shape for k, v in state.items()}
    empty.load_state_dict(state, assign=True)
    x = torch.randn(4, 64)
    assert torch.equal(empty(x), ql(x))


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32)])
def test_quant_embedding_dequantizes_rows(bits, group):
    emb = nn.Embedding(20, 64)
    qe = QuantEmbedding.from_embedding(emb, bits, group)
    ids = torch.tensor([[0, 5, 19]])
    out = qe(ids)
    assert out.shape == (1, 3, 64) and out.dtype == torch.float32
    assert torch.allclose(out, emb(ids), atol=0.05 if bits == 8 else 0.5)


def test_shapes_the_kernels_cannot_take_are_refused():
    with pytest.raises(OpenGLMError, match="group size"):
        QuantLinear.from_linear(_linear(k=48), 4, 32)
    with pytest.raises(OpenGLMError, match="multiple of 8 inputs"):  # PyTorch's int8 kernel crashes on those
        QuantLinear.from_linear(_linear(k=12), 8)
    with pytest.raises(OpenGLMError, match="multiple of 16"):
        QuantLinear.from_linear(_linear(n=40), 4, 32)


@pytest.mark.parametrize("bits,group,symmetric", [(8, None, True), (4, 32, True), (4, 64, False)])
@pytest.mark.parametrize("compile", [False, True])
def test_shared_input_products_equal_the_separate_layers(bits, group, symmetric, compile):
    from openglm.quant.linear import SharedInputProducts

    layers = [QuantLinear.from_linear(_linear(n, 128, bias=b, seed=n), bits, group, symmetric)
              for n, b in ((96, True), (32, False), (48, True))]  # q, k, v of different sizes
    fused = SharedInputProducts.of(layers)
    assert fused is not None
    x = torch.randn(2, 3, 128)
    run = torch.compile(fused, fullgraph=True) if compile else fused
    if compile:
        torch._dynamo.reset()
    with torch.inference_mode():
        for got, layer in zip(run(x), layers):
            assert torch.equal(got, layer(x))  # the same arithmetic per row: bit-identical
        many = torch.randn(kernels.DEQUANT_ROWS, 128)  # a prefill: layer by layer
        assert all(torch.equal(g, m(many)) for g, m in zip(fused(many), layers))


def test_shared_input_products_only_where_the_kernels_take_them_together(monkeypatch):
    from openglm.quant.linear import SharedInputProducts

    q = QuantLinear.from_linear(_linear(32, 64), 4, 32)
    assert SharedInputProducts.of([q, QuantLinear.from_linear(_linear(32, 64), 4, 64), q]) is None  # group sizes
    assert SharedInputProducts.of([q, QuantLinear.from_linear(_linear(32, 64), 8), q]) is None  # schemes
    assert SharedInputProducts.of([q, _linear(32, 64), q]) is None  # a float layer
    monkeypatch.setitem(kernels._state, "lib", None)
    assert SharedInputProducts.of([q, q, q]) is None  # no compiled kernels
