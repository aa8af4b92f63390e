import pytest
import torch
import torch.nn.functional as F

from openglm.train import loss as loss_module
from openglm.train.loss import linear_cross_entropy


def reference(h, w, t):
    return F.cross_entropy(h @ w.T, t, reduction="sum")


@pytest.mark.parametrize("chunk_elements", [2**23, 3 * 50])  # one chunk; chunks of 3 rows, the last short
def test_matches_cross_entropy_and_its_gradients(chunk_elements, monkeypatch):
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", chunk_elements)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(10, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (10,), generator=g)
    want = reference(h, w, t)
    (want * 0.5).backward()
    want_grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    got = linear_cross_entropy(h, w, t)
    (got * 0.5).backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(h.grad, want_grads[0])
    torch.testing.assert_close(w.grad, want_grads[1])


def test_without_gradients_and_under_bf16_autocast():
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(7, 16, generator=g), torch.randn(30, 16, generator=g)
    t = torch.randint(0, 30, (7,), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, t), reference(h, w, t))
    h.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(h, w, t)
    assert got.dtype == torch.float32  # computed in fp32 inside, whatever the autocast
    torch.testing.assert_close(got, reference(h, w, t))
    got.backward()
    assert h.grad.dtype == torch.float32 and torch.isfinite(h.grad).all()
