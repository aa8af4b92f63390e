"""Weight-only quantized ``Linear`` and ``Embedding`` modules, and the portable tensor format they save.

Portable format (what ``state_dict()`` holds and the safetensors file stores), for a weight
``[N, K]`` (N outputs or vocabulary rows, K inputs or hidden size):

- INT8, per output channel, symmetric: ``weight`` int8 ``[N, K]``, ``weight_scale`` bfloat16 ``[N]``;
  ``w = weight * weight_scale[:, None]``.
- INT4, group-wise along K (``group_size`` columns per group, G = K / group_size groups):
  ``weight`` uint8 ``[N, K / 2]``, two values per byte, column ``2j`` in the low nibble and ``2j + 1``
  in the high nibble; ``weight_scale`` bfloat16 ``[N, G]``; ``weight_zero`` uint8 ``[N, G]``
  (asymmetric only, values 0..15; symmetric means zero 8). ``w = (q - zero) * scale`` per group.

The products read the small integer weights and never build the full-precision matrix. On the
CPU they run the kernels of ``openglm.kernels`` on the portable tensors as they are (float32
activations; INT4 takes them at int16 precision per group); a product with many activation rows
(a prefill) dequantizes a block of weight rows at a time into a float32 buffer instead. Where the
kernels cannot be built (no compiler), PyTorch's packed weight-only kernels run instead
(``aten._weight_int8pack_mm`` and ``aten._weight_int4pack_mm_for_cpu``, with bfloat16 activations,
slower at decode): the int4 one wants its own, CPU-specific nibble layout, built from the portable
form when a module is loaded (the portable tensors are then dropped and ``state_dict()`` rebuilds
them exactly from it).
Either way an INT4 model holds half a byte per weight plus its scales. Scales are bfloat16, the
kernels' own precision, so what is saved is exactly what runs.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import OpenGLMError
from .. import kernels

INT4_ROW_MULTIPLE = 16  # the CPU int4 kernel packs 16 output rows together


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [N, K]`` -> (int8 ``[N, K]``, bfloat16 scale ``[N]``), symmetric per row."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(torch.bfloat16)
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w: torch.Tensor, group_size: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``w [N, K]`` -> (packed uint8 ``[N, K/2]``, bfloat16 scale ``[N, G]``, uint8 zero ``[N, G]`` or None).

    Symmetric groups follow GGUF ``q4_0``: the value of largest magnitude maps exactly to ``-8``
    (``scale = w_absmax / -8``): all 16 levels are used, the extreme is exact, and only values
    beyond 7 steps on the other side are clipped. Asymmetric groups span ``[min, max]`` (widened to
    include 0) in 15 steps with an integer zero point.
    """
    N, K = w.shape
    g = w.float().view(N, K // group_size, group_size)  # (N, G, group)
    if symmetric:
        extreme = g.gather(-1, g.abs().argmax(-1, keepdim=True)).squeeze(-1)  # signed value of largest |w|
        scale = extreme / -8
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = torch.full_like(scale, 8)
    else:
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)  # keep 0 representable
        scale = ((hi - lo) / 15).clamp(min=1e-12)
        zero = torch.round(-lo / scale.bfloat16().float()).clamp(0, 15)
    scale = scale.bfloat16().float()  # quantize with the scale that will be stored
    q = (torch.round(g / scale[..., None]) + zero[..., None]).clamp(0, 15).to(torch.uint8).view(N, K)
    return pack_nibbles(q), scale.bfloat16(), None if symmetric else zero.to(torch.uint8)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, K]`` values 0..15 -> ``[N, K/2]``, even columns in the low nibble."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_nibbles``: ``[N, K/2]`` -> uint8 ``[N, K]``."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


def dequantize(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
               group_size: int | None) -> torch.Tensor:
    """The float32 weight a portable quantized tensor stands for (embedding rows, tests)."""
    if bits == 8:
        return weight.float() * scale.float()[..., None]
    q = unpack_nibbles(weight).float()
    z = 8.0 if zero is None else zero.float()[..., None]
    g = q.unflatten(-1, (-1, group_size))  # (..., G, group)
    return ((g - z) * scale.float()[..., None]).flatten(-2)


class QuantLinear(nn.Module):
    """``y = x @ dequantize(W).T + b`` with ``W`` held as INT8 per channel or INT4 per group (CPU).

    ``bits`` is 8 or 4; ``group_size`` and ``symmetric`` apply to INT4. Built empty (e.g. on the
    meta device) with the portable buffers and filled by ``load_state_dict`` (``assign=True`` works),
    or made by ``from_linear``. Loading packs INT4 weights into the kernel's layout: ``weight`` then
    holds that layout and the scales live only in ``scales_and_zeros``; ``state_dict()`` gives the
    portable tensors back, exactly.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int | None = None,
                 symmetric: bool = True, dtype: torch.dtype = torch.float32):
        super().__init__()
        check_shape(out_features, in_features, bits, group_size)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.packed = False  # INT4 weights in PyTorch's kernel layout (when ours cannot run)
        self.use_kernels = False  # decided when weights arrive (pack)
        self._portable_buffers()
        # The INT4 kernel's bf16 [G, N, 2] (scale, offset) pairs, built by pack(): never saved.
        self.register_buffer("scales_and_zeros", None, persistent=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None

    def _portable_buffers(self) -> None:
        N, K = self.out_features, self.in_features
        if self.bits == 8:
            self.register_buffer("weight", torch.empty(N, K, dtype=torch.int8))
            self.register_buffer("weight_scale", torch.empty(N, dtype=torch.bfloat16))
            return
        G = K // self.group_size
        self.register_buffer("weight", torch.empty(N, K // 2, dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.empty(N, G, dtype=torch.bfloat16))
        if not self.symmetric:
            self.register_buffer("weight_zero", torch.empty(N, G, dtype=torch.uint8))

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int | None = None, symmetric: bool = True) -> "QuantLinear":
        """Quantize a float ``nn.Linear`` (on the CPU)."""
        w = linear.weight.detach()
        N, K = w.shape
        with torch.device("meta"):
            m = cls(K, N, linear.bias is not None, bits, group_size, symmetric, w.dtype)
        if bits == 8:
            q, scale = quantize_int8(w)
            state = {"weight": q, "weight_scale": scale}
        else:
            q, scale, zero = quantize_int4(w, group_size, symmetric)
            state = {"weight": q, "weight_scale": scale} | ({} if zero is None else {"weight_zero": zero})
        if linear.bias is not None:
            state["bias"] = linear.bias.detach()
        m.load_state_dict(state, assign=True)
        return m

    @torch.no_grad()
    def pack(self) -> None:
        """Choose the kernels for weights that just arrived; PyTorch's INT4 kernel needs its own layout.

        Our kernels (and PyTorch's INT8 one) run on the portable form as it is.
        """
        if self.packed or self.weight.device.type == "meta":
            return
        if self.weight.device.type != "cpu":
            raise OpenGLMError("quantized layers run on the CPU only")
        self.use_kernels = kernels.supports(self.bits, self.in_features, self.group_size) and kernels.available()
        if self.use_kernels:  # the library reads raw memory: row-major buffers
            for name in ("weight", "weight_scale", "weight_zero"):
                if getattr(self, name, None) is not None:
                    setattr(self, name, getattr(self, name).contiguous())
            return
        if self.bits == 8:
            return
        q = unpack_nibbles(self.weight).to(torch.int32)  # (N, K)
        zero = getattr(self, "weight_zero", None)
        self.scales_and_zeros = _scales_and_zeros(self.weight_scale, zero)
        self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        self.weight_scale = None
        if zero is not None:
            self.weight_zero = None
        self.packed = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_kernels:
            x2 = x.reshape(-1, self.in_features)  # (B*T, K)
            zero = getattr(self, "weight_zero", None)
            if x2.shape[0] >= kernels.DEQUANT_ROWS and not torch.compiler.is_compiling():  # prefill
                y = prefill_product(x2, self.bits, self.weight, self.weight_scale, zero, self.in_features)
            elif self.bits == 8:
                y = kernels.int8_matmul(x2, self.weight, self.weight_scale)
            else:
                y = kernels.int4_matmul(x2, self.weight, self.weight_scale, zero)
            return self._output(y, x)
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (B*T, K)
        if self.bits == 8:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.weight_scale)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, self.group_size, self.scales_and_zeros)
        return self._output(y, x)

    def _output(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The product ``y [B*T, N]`` of input ``x [..., K]`` as the layer's output ``[..., N]``: x's dtype, plus the bias."""
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.packed:
            destination.update({prefix + k: v for k, v in self.portable_int4().items()})

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.packed:  # loading portable tensors again: back to the portable buffers first
            device = self.weight.device
            with torch.device(device):
                self._portable_buffers()
            self.scales_and_zeros, self.packed = None, False
        self.use_kernels = False
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.weight_scale = self.weight_scale.to(torch.bfloat16)  # a loader may have cast it with the float weights
        self.pack()

    @torch.no_grad()
    def portable_int4(self) -> dict[str, torch.Tensor]:
        """``weight``, ``weight_scale`` (and ``weight_zero``) in the portable form, read back from the kernel layout.

        The kernel computes ``x @ ((q - 8) * scale + offset).T``; with unit scales, zero offsets and
        ``x`` the identity it returns ``(q - 8).T``, small integers that bfloat16 holds exactly.
        The scales are stored as they are; ``offset = (8 - zero) * scale`` gives the zero back.
        """
        G, N, K = self.in_features // self.group_size, self.out_features, self.in_features
        unit = torch.zeros(G, N, 2, dtype=torch.bfloat16)
        unit[..., 0] = 1
        eye = torch.eye(K, dtype=torch.bfloat16)
        q = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.weight, self.group_size, unit)  # (K, N)
        scale, offset = self.scales_and_zeros.float().unbind(-1)  # (G, N) each
        out = {"weight": pack_nibbles((q.t().float() + 8).to(torch.uint8).contiguous()),
               "weight_scale": scale.t().to(torch.bfloat16).contiguous()}
        if not self.symmetric:
            out["weight_zero"] = (8 - torch.round(offset / scale)).t().to(torch.uint8).contiguous()
        return out

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}, symmetric={self.symmetric}" if self.bits == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}{group}"


class SharedInputProducts:
    """Three ``QuantLinear`` layers that read the same input (a layer's q, k and v) run as one kernel call.

    One pass over the input, one team of threads and one call instead of three: a decode step makes
    ~70 small products, and each call costs a few microseconds beyond its arithmetic. The layers keep
    their own weights (state dicts and checkpoints are unchanged); ``of`` gives None where the
    kernels cannot take them together. Prefills (``DEQUANT_ROWS`` rows and more) run layer by layer.
    """

    def __init__(self, layers):
        self.layers = tuple(layers)

    @classmethod
    def of(cls, layers) -> "SharedInputProducts | None":
        if len(layers) != 3 or not kernels.cpp_operators_available():
            return None
        first = layers[0]
        same = all(isinstance(m, QuantLinear) and m.use_kernels and m.bits == first.bits and m.in_features == first.in_features
                   and m.group_size == first.group_size for m in layers)
        return cls(layers) if same else None

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        layers = self.layers
        x2 = x.reshape(-1, layers[0].in_features)
        if not all(m.use_kernels for m in layers) or (x2.shape[0] >= kernels.DEQUANT_ROWS and not torch.compiler.is_compiling()):
            return [m(x) for m in layers]
        if layers[0].bits == 8:
            ys = kernels.int8_matmul3(x2, *(t for m in layers for t in (m.weight, m.weight_scale)))
        else:
            ys = kernels.int4_matmul3(x2, *(t for m in layers
                                           for t in (m.weight, m.weight_scale, getattr(m, "weight_zero", None))))
        return [m._output(y, x) for m, y in zip(layers, ys)]


def _scales_and_zeros(scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """Portable ``scale, zero [N, G]`` -> the kernel's bf16 ``[G, N, 2]``.

    The kernel computes ``w = (q - 8) * scale + offset``; ``(q - zero) * scale`` gives
    ``offset = (8 - zero) * scale`` (0 when symmetric).
    """
    scale = scale.float()
    offset = torch.zeros_like(scale) if zero is None else (8 - zero.float()) * scale
    return torch.stack((scale, offset), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)


class QuantEmbedding(nn.Module):
    """An embedding table stored quantized by row (INT8 per row, INT4 per group along the hidden size).

    A lookup dequantizes only the rows it reads: ``ids [B, T]`` -> ``[B, T, C]`` in ``dtype``.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, group_size: int | None = None,
                 symmetric: bool = True, dtype: torch.dtype = torch.float32):
        super().__init__()
        check_shape(INT4_ROW_MULTIPLE, embedding_dim, bits, group_size)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.bits, self.group_size, self.symmetric, self.out_dtype = bits, group_size, symmetric, dtype
        V, C = num_embeddings, embedding_dim
        if bits == 8:
            self.register_buffer("weight", torch.empty(V, C, dtype=torch.int8))
            self.register_buffer("weight_scale", torch.empty(V, dtype=torch.bfloat16))
        else:
            self.register_buffer("weight", torch.empty(V, C // 2, dtype=torch.uint8))
            self.register_buffer("weight_scale", torch.empty(V, C // group_size, dtype=torch.bfloat16))
            if not symmetric:
                self.register_buffer("weight_zero", torch.empty(V, C // group_size, dtype=torch.uint8))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, bits: int, group_size: int | None = None, symmetric: bool = True) -> "QuantEmbedding":
        w = emb.weight.detach()
        with torch.device("meta"):
            m = cls(w.shape[0], w.shape[1], bits, group_size, symmetric, w.dtype)
        if bits == 8:
            q, scale = quantize_int8(w)
            state = {"weight": q, "weight_scale": scale}
        else:
            q, scale, zero = quantize_int4(w, group_size, symmetric)
            state = {"weight": q, "weight_scale": scale} | ({} if zero is None else {"weight_zero": zero})
        m.load_state_dict(state, assign=True)
        return m

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.weight_scale = self.weight_scale.to(torch.bfloat16)  # a loader may have cast it with the float weights

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        zero = getattr(self, "weight_zero", None)
        rows = dequantize(self.weight[ids], self.weight_scale[ids], None if zero is None else zero[ids],
                          self.bits, self.group_size)  # (B, T, C)
        return rows.to(self.out_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int{self.bits}"


def prefill_product(x: torch.Tensor, bits: int, weight: torch.Tensor, scale: torch.Tensor,
                     zero: torch.Tensor | None, in_features: int) -> torch.Tensor:
    """``x [M, K] @ W^T`` for many rows of ``x``: integer products on x rounded to int8 where the kernels
    have them (INT4; INT8 with VNNI), else float products on the weight dequantized block by block."""
    if bits == 4:
        return kernels.int4_prefill_matmul(x, weight, scale, zero)
    if kernels.int8_prefill_available(in_features):
        return kernels.int8_prefill_matmul(x, weight, scale)
    return kernels.dequant_matmul(x.float().contiguous(), bits, weight, scale, zero, in_features)


def check_shape(out_features: int, in_features: int, bits: int, group_size: int | None) -> None:
    """Raise ``OpenGLMError`` if a ``[out, in]`` weight cannot take this scheme."""
    if bits not in (4, 8):
        raise OpenGLMError(f"quantization to {bits} bits is not supported (8 or 4)")
    if bits == 8 and in_features % 8:
        raise OpenGLMError(f"INT8 needs a multiple of 8 inputs, got {in_features}")
    if bits == 4:
        if not group_size or in_features % group_size:
            raise OpenGLMError(f"INT4 group size {group_size} does not divide the input size {in_features}")
        if out_features % INT4_ROW_MULTIPLE:
            raise OpenGLMError(f"INT4 needs a multiple of {INT4_ROW_MULTIPLE} outputs, got {out_features}")
