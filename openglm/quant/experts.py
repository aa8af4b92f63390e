"""Weight-only INT8/INT4 routed experts: ``Experts`` whose stacked projections are held quantized.

Each projection keeps the portable format of ``QuantLinear`` (see ``openglm.quant.linear``) with a
leading expert dimension: for ``gate_up_proj`` ``[E, N, K]``, INT8 ``gate_up_proj`` int8 ``[E, N, K]``
and ``gate_up_proj_scale`` bfloat16 ``[E, N]``; INT4 ``gate_up_proj`` uint8 ``[E, N, K/2]``,
``gate_up_proj_scale`` ``[E, N, G]`` and, asymmetric, ``gate_up_proj_zero`` uint8 ``[E, N, G]``.
The router is never quantized: it stays a float32 ``Router``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
from ..errors import OpenGLMError
from ..model.glm import Experts
from .linear import check_shape, dequantize, prefill_product, quantize_int4, quantize_int8

PROJECTIONS = ("gate_up_proj", "down_proj")


class QuantExperts(Experts):
    """Routed experts with INT8 (per output channel) or INT4 (per group) weights, computed like
    ``Experts``: one product per expert that has tokens, on that expert's integer weights only."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, bits: int,
                 group_size: int | None = None, symmetric: bool = True):
        nn.Module.__init__(self)
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        E, C, I = num_experts, hidden_size, intermediate_size
        for name, (N, K) in zip(PROJECTIONS, ((2 * I, C), (C, I))):
            check_shape(N, K, bits, group_size)
            if bits == 8:
                self.register_buffer(name, torch.empty(E, N, K, dtype=torch.int8))
                self.register_buffer(f"{name}_scale", torch.empty(E, N, dtype=torch.bfloat16))
            else:
                self.register_buffer(name, torch.empty(E, N, K // 2, dtype=torch.uint8))
                self.register_buffer(f"{name}_scale", torch.empty(E, N, K // group_size, dtype=torch.bfloat16))
                if not symmetric:
                    self.register_buffer(f"{name}_zero", torch.empty(E, N, K // group_size, dtype=torch.uint8))

    @classmethod
    def from_experts(cls, experts: Experts, bits: int, group_size: int | None = None, symmetric: bool = True) -> "QuantExperts":
        """Quantize float ``Experts`` (on the CPU), expert by expert."""
        E, twice_I, C = experts.gate_up_proj.shape
        with torch.device("meta"):
            m = cls(E, C, twice_I // 2, bits, group_size, symmetric)
        state = {}
        for name in PROJECTIONS:
            parts = [quantize_int8(w) + (None,) if bits == 8 else quantize_int4(w, group_size, symmetric)
                     for w in getattr(experts, name).detach()]
            q, scale, zero = zip(*parts)
            state[name], state[f"{name}_scale"] = torch.stack(q), torch.stack(scale)
            if zero[0] is not None:
                state[f"{name}_zero"] = torch.stack(zero)
        m.load_state_dict(state, assign=True)
        return m

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        for name in PROJECTIONS:  # a loader may have cast the scales with the float weights; the kernels read bf16
            setattr(self, f"{name}_scale", getattr(self, f"{name}_scale").to(torch.bfloat16).contiguous())

    def products(self, x: torch.Tensor, projection: str, counts: torch.Tensor) -> torch.Tensor:
        weight, scale = getattr(self, projection), getattr(self, f"{projection}_scale")
        zero = getattr(self, f"{projection}_zero", None)
        if weight.device.type != "cpu":
            raise OpenGLMError("quantized layers run on the CPU only")
        K = weight.shape[-1] * (2 if self.bits == 4 else 1)
        fast = kernels.supports(self.bits, K, self.group_size) and kernels.available()
        hit = counts.nonzero().flatten().tolist()
        rows = x.float().split(counts[counts > 0].tolist())
        out = []
        for e, r in zip(hit, rows):
            z = None if zero is None else zero[e]
            if not fast:  # no compiler for the kernels: this expert's float weights, then the product
                out.append(F.linear(r, dequantize(weight[e], scale[e], z, self.bits, self.group_size)))
            elif r.shape[0] >= kernels.DEQUANT_ROWS:  # many tokens: the prefill products
                out.append(prefill_product(r, self.bits, weight[e], scale[e], z, K))
            elif self.bits == 8:
                out.append(kernels.int8_matmul(r, weight[e], scale[e]))
            else:
                out.append(kernels.int4_matmul(r, weight[e], scale[e], z))
        y = torch.cat(out) if out else x.new_zeros(0, weight.shape[1], dtype=torch.float32)
        return y.to(x.dtype)

    def slot_products(self, x: torch.Tensor, projection: str, experts: torch.Tensor) -> torch.Tensor:
        zero = getattr(self, f"{projection}_zero", None)
        w = dequantize(getattr(self, projection)[experts], getattr(self, f"{projection}_scale")[experts],
                       None if zero is None else zero[experts], self.bits, self.group_size)  # (slots, N, K)
        return torch.bmm(w, x.float()[:, :, None]).squeeze(-1).to(x.dtype)

    def extra_repr(self) -> str:
        E, N, _ = self.gate_up_proj.shape
        return f"{E} experts, width {N // 2}, int{self.bits}" + (f", group {self.group_size}" if self.bits == 4 else "")
