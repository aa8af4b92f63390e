"""The compiled INT8/INT4 kernels against the float product of the dequantized weights."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from openglm import kernels
from openglm.quant.linear import QuantLinear, dequantize, quantize_int4, quantize_int8

pytestmark = pytest.mark.skipif(not kernels.available(), reason="needs a C++ compiler")


# Builds for instruction sets below this machine's: AVX2 without VNNI, and the portable C++ loops.
_X86_LEVELS = {"native": None, "avx2": "-march=x86-64-v3", "portable": "-march=x86-64"}


@pytest.fixture(params=list(_X86_LEVELS))
def isa(request, monkeypatch, tmp_path_factory):
    """The kernels built for this CPU, and (on x86-64) for lesser ones: every code path gives the same products."""
    march = _X86_LEVELS[request.param]
    if march is not None:
        if platform.machine() not in ("x86_64", "AMD64"):
            pytest.skip("x86-64 instruction levels")
        monkeypatch.setattr(kernels, "FLAGS", [march if f == "-march=native" else f for f in kernels.FLAGS])
        monkeypatch.setenv("OPENGLM_CACHE", str(tmp_path_factory.getbasetemp() / "kernels"))
        monkeypatch.setitem(kernels._state, "lib", kernels._build(torch_ops=False))
        assert kernels.available()
    return request.param


def _close(y, expected, tol):
    err = (y - expected).abs().max() / expected.abs().max()
    assert err < tol, f"relative error {err:.2e}"


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8, 9, 33])
@pytest.mark.parametrize("N,K", [(40, 72), (48, 64), (7, 8)])  # rows and columns off the kernels' blocks
def test_int8_any_rows(M, N, K, isa):
    g = torch.Generator().manual_seed(M * 100 + N)
    w = torch.randn(N, K, generator=g)
    q, scale = quantize_int8(w)
    x = torch.randn(M, K, generator=g)
    _close(kernels.int8_matmul(x, q, scale), x @ dequantize(q, scale, None, 8, None).t(), 1e-5)


@pytest.mark.parametrize("M", [1, 3, 4, 6, 17])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_any_rows_groups_and_zero_points(M, group, symmetric, isa):
    N, K = 40, 384  # 384 / 32 = 12 groups: a block of 8 and a remainder
    g = torch.Generator().manual_seed(M * 1000 + group)
    w = torch.randn(N, K, generator=g) + (0 if symmetric else 0.7)  # shifted: zero points away from 8
    q, scale, zero = quantize_int4(w, group, symmetric)
    x = torch.randn(M, K, generator=g) * torch.logspace(-3, 1, K)  # columns of very different sizes
    expected = x @ dequantize(q, scale, zero, 4, group).t()
    _close(kernels.int4_matmul(x, q, scale, zero), expected, 1e-4)  # x at int16 precision per group


def _int8_rounding_bound(x, w, group):
    """The most ``x`` rounded to int8 per (row, group) can move ``x @ w.T``: half a step times sum |w| per group."""
    M, K = x.shape
    step = x.view(M, K // group, group).abs().amax(-1) / 127  # (M, G)
    return step @ w.abs().view(w.shape[0], K // group, group).sum(-1).t() / 2  # (M, N)


@pytest.mark.parametrize("M", [1, 5, 6, 7, 13, 48])
@pytest.mark.parametrize("N", [40, 64, 97])  # rows off the tiles of 16 and 32, and whole ones
@pytest.mark.parametrize("group,symmetric", [(32, True), (64, False), (128, True), (32, False)])
def test_int4_prefill_within_the_int8_rounding_of_x(M, N, group, symmetric, isa):
    K = 1024 if group == 32 else 384  # 1024 / 32 = 32 groups: the tile is taken in more than one pass
    g = torch.Generator().manual_seed(M * 1000 + N + group)
    w = torch.randn(N, K, generator=g) + (0 if symmetric else 0.7)
    q, scale, zero = quantize_int4(w, group, symmetric)
    x = torch.randn(M, K, generator=g) * torch.logspace(-3, 1, K)  # groups of very different sizes
    wd = dequantize(q, scale, zero, 4, group)
    expected = x @ wd.t()
    err = (kernels.int4_prefill_matmul(x, q, scale, zero) - expected).abs()
    bound = _int8_rounding_bound(x, wd, group) + 1e-5 * (x.abs() @ wd.abs().t())  # plus float rounding
    assert (err <= bound).all(), f"{(err / bound).max():.2f} of the bound"
    assert err.max() > 1e-6 * expected.abs().max()  # x was rounded (not the float product of test_int4_any_rows...)


@pytest.mark.parametrize("M", [1, 6, 7, 48])
@pytest.mark.parametrize("N,K", [(40, 1024), (97, 384), (64, 32)])
def test_int8_prefill_within_the_int8_rounding_of_x(M, N, K, isa):
    if not kernels.int8_prefill_available(K):
        pytest.skip("INT8 prefill products need VNNI")
    g = torch.Generator().manual_seed(M * 1000 + N)
    q, scale = quantize_int8(torch.randn(N, K, generator=g))
    x = torch.randn(M, K, generator=g) * torch.logspace(-3, 1, K)
    wd = dequantize(q, scale, None, 8, None)
    expected = x @ wd.t()
    err = (kernels.int8_prefill_matmul(x, q, scale) - expected).abs()
    bound = _int8_rounding_bound(x, wd, 32) + 1e-5 * (x.abs() @ wd.abs().t())
    assert (err <= bound).all(), f"{(err / bound).max():.2f} of the bound"
    assert err.max() > 1e-6 * expected.abs().max()


def test_int4_prefill_zero_rows_and_groups():
    q, scale, zero = quantize_int4(torch.randn(16, 64), 32, False)
    x = torch.zeros(3, 64)
    x[1, 32:] = torch.randn(32)  # a row whose first group is all zeros
    w = dequantize(q, scale, zero, 4, 32)
    y = kernels.int4_prefill_matmul(x, q, scale, zero)
    assert torch.equal(y[[0, 2]], torch.zeros(2, 16))
    assert ((y - x @ w.t()).abs() <= _int8_rounding_bound(x, w, 32) + 1e-5).all()


@pytest.mark.parametrize("bits,group,symmetric", [(8, None, True), (4, 32, True), (4, 64, False)])
def test_many_rows_take_the_prefill_products(bits, group, symmetric, isa, monkeypatch):
    # A prefill: the products round x to int8 per group (INT8 weights: where the CPU has VNNI;
    # elsewhere they are dequantized a block of rows at a time, one block then three, and
    # multiplied in float).
    lin = nn.Linear(128, 48, bias=True)
    ql = QuantLinear.from_linear(lin, bits, group, symmetric)
    state = ql.state_dict()
    w = dequantize(state["weight"], state["weight_scale"], state.get("weight_zero"), bits, group)
    for block_rows in (48, 16):
        monkeypatch.setattr(kernels, "_BLOCK_BYTES", block_rows * 128 * 4)
        for rows in (kernels.DEQUANT_ROWS - 1, kernels.DEQUANT_ROWS, 100):  # the loops, then the prefill products
            x = torch.randn(rows, 128)
            y, expected = ql(x), x @ w.t() + lin.bias
            if rows >= kernels.DEQUANT_ROWS and (bits == 4 or kernels.int8_prefill_available(128)):
                assert ((y - expected).abs() <= _int8_rounding_bound(x, w, group or 32) + 1e-5).all()
            else:
                _close(y, expected, 1e-5 if bits == 8 else 1e-4)


def test_zero_activations_and_bf16_inputs():
    q, scale, _ = quantize_int4(torch.randn(16, 64), 32, True)
    assert torch.equal(kernels.int4_matmul(torch.zeros(2, 64), q, scale, None), torch.zeros(2, 16))
    lin = nn.Linear(64, 16, bias=False).to(torch.bfloat16)
    ql = QuantLinear.from_linear(lin, 4, 32)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert ql(x).dtype == torch.bfloat16


def test_shapes_only_pytorch_takes_use_its_kernels():
    assert not kernels.supports(4, 64, 256) and kernels.supports(4, 256, 256)
    lin = nn.Linear(256, 16)
    ql = QuantLinear.from_linear(lin, 4, 256)  # one group of 256: PyTorch's int4 kernel takes it, and so do we
    assert ql.use_kernels
    assert not kernels.supports(4, 64, 16)  # groups of 16: neither (refused when quantizing, tests/quant/test_linear.py)
    assert not kernels.supports(4, 16384, 16384)  # int32 sums could overflow


def test_compiled_forward_uses_the_custom_operator():
    torch._dynamo.reset()
    lin = nn.Linear(64, 32)
    ql8, ql4 = QuantLinear.from_linear(lin, 8), QuantLinear.from_linear(lin, 4, 32, symmetric=False)

    def f(x):
        return ql8(x) + ql4(x)

    x = torch.randn(2, 64)
    compiled = torch.compile(f, fullgraph=True)
    assert torch.allclose(compiled(x), f(x), atol=1e-5)


def test_built_once_into_the_cache_and_off_by_environment(tmp_path):
    code = ("import torch; from openglm import kernels; print(kernels.available(), "
            "sorted(p.suffix for p in kernels.cache_dir().glob('*')) if kernels.cache_dir().exists() else [])")
    env = {**os.environ, "OPENGLM_CACHE": str(tmp_path)}
    run = lambda extra: subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True,
                                       text=True, check=True).stdout.split(maxsplit=1)
    assert run({"OPENGLM_KERNELS": "0"}) == ["False", "[]\n"]
    assert run({}) == ["True", "['.so']\n"]
    built = list(tmp_path.glob("*.so"))[0].stat().st_mtime_ns
    assert run({}) == ["True", "['.so']\n"]  # reused, not rebuilt
    assert list(tmp_path.glob("*.so"))[0].stat().st_mtime_ns == built


def test_without_pytorch_headers_the_operators_are_registered_from_python(tmp_path):
    # Where the C++ registration cannot be built, the same operators come from Python: compiled
    # graphs still run the kernels, and attention falls back to SDPA.
    code = """
import torch, torch.nn as nn
from openglm import kernels
kernels._torch_flags = lambda: ["-DOPENGLM_TORCH_OPS", "-I/nonexistent", "<source>"]  # the headers are missing
from openglm.quant.linear import QuantLinear, SharedInputProducts
ql = QuantLinear.from_linear(nn.Linear(64, 32), 4, 32)
x = torch.randn(2, 64)
compiled = torch.compile(lambda x: ql(x), fullgraph=True)
print(kernels._state["ops"], kernels.cpp_operators_available(), SharedInputProducts.of([ql, ql, ql]),
      torch.allclose(compiled(x), ql(x), atol=1e-6))
"""
    env = {**os.environ, "OPENGLM_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["Python", "False", "None", "True"]
