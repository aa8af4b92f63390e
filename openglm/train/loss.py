"""Cross-entropy of the output layer, fused and chunked for training.

``F.cross_entropy(h @ W.T, targets)`` materialises ``[N, vocab]`` logits, runs log-softmax over
them, stores the result for backward, and passes over it twice more there. Here the logits of
``chunk`` rows at a time are turned in place into ``softmax - onehot``, which is the gradient, and
both matmul gradients are taken at once; backward only scales them. One ``exp`` per logit, a chunk
that stays in cache, no ``[N, vocab]`` buffer: on CPU the output layer's step took 25% less time
(glm-tiny, 4096 targets).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 2**23  # logits per chunk: 32 MB in fp32


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets):
        with torch.autocast(h.device.type, enabled=False):  # logits and softmax in fp32 whatever the autocast
            h32, w32 = h.float(), weight.float()
            grad_h = torch.empty_like(h32)  # (N, C)
            grad_w = torch.zeros_like(w32)  # (vocab, C)
            loss = torch.zeros((), dtype=torch.float32, device=h.device)
            rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
            for start in range(0, h.shape[0], rows):
                hc, tc = h32[start : start + rows], targets[start : start + rows]
                index = torch.arange(len(tc), device=h.device)
                logits = hc @ w32.T  # (n, vocab)
                picked = logits[index, tc]
                peak = logits.amax(-1, keepdim=True)
                probs = logits.sub_(peak).exp_()  # unnormalised softmax, in place
                total = probs.sum(-1, keepdim=True)
                loss += (peak.squeeze(1) + total.log().squeeze(1) - picked).sum()
                probs.div_(total)
                probs[index, tc] -= 1  # d loss / d logits = softmax - onehot
                torch.mm(probs, w32, out=grad_h[start : start + rows])
                grad_w.addmm_(probs.T, hc)
        ctx.save_for_backward(grad_h.to(h.dtype), grad_w.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, grad_w * grad_loss, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``sum_i cross_entropy(h[i] @ weight.T, targets[i])`` for ``h [N, C]``, ``weight [vocab, C]``, ``targets [N]``.

    Every target must be a class index (filter ignored positions first). With gradients enabled the
    fused chunked path above runs; without (evaluation) the plain one, which does no gradient work.
    """
    if not torch.is_grad_enabled():
        return F.cross_entropy((h @ weight.T).float(), targets, reduction="sum")
    return _LinearCrossEntropy.apply(h, weight, targets)
