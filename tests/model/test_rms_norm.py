"""RMSNorm's one-call inference path gives the bits of its explicit formula (the training path)."""

import pytest
import torch

from openglm.model.glm import RMSNorm


@pytest.mark.parametrize("shape", [(1, 1, 256), (16, 1, 256), (3, 7, 4096), (2, 5, 8, 64)])
def test_inference_norm_matches_the_formula_bit_for_bit(shape):
    torch.manual_seed(0)
    norm = RMSNorm(shape[-1], 1.5625e-7)
    norm.weight.data.normal_()
    x = torch.randn(shape) * 7
    with torch.no_grad():
        fast = norm(x)
    formula = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps))
    assert torch.equal(fast, formula.detach())
    x.requires_grad_(True)
    assert torch.equal(norm(x).detach(), fast)  # with gradients: the explicit operations, the same values
