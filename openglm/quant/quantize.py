"""Weight-only quantization of a whole model, and the scheme record saved with a quantized checkpoint.

``quantize_model`` swaps ``nn.Linear`` / ``nn.Embedding`` modules for ``QuantLinear`` /
``QuantEmbedding`` in place, and a MoE model's routed ``Experts`` for ``QuantExperts`` (its routers
stay in full precision). The scheme travels in the safetensors metadata under
``QUANT_METADATA_KEY`` (a JSON object, see ``QuantScheme``), so a loader never guesses it from a
file name; ``build_quantized`` recreates the same modules on an empty (meta) model before loading.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch.nn as nn

from ..errors import OpenGLMError
from ..model.glm import Experts
from .experts import QuantExperts
from .linear import QuantEmbedding, QuantLinear

QUANT_METADATA_KEY = "openglm_quantization"
SCHEMES = {"int8": 8, "int4": 4}
GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class QuantScheme:
    """What was quantized and how: ``scheme`` "int8" (per output channel, symmetric) or "int4"
    (groups of ``group_size`` inputs, ``symmetric`` or with zero points); ``modules`` are the
    quantized module names (e.g. ``model.layers.0.mlp.down_proj``, ``lm_head``)."""

    scheme: str
    group_size: int | None
    symmetric: bool
    modules: tuple[str, ...]

    @property
    def bits(self) -> int:
        return SCHEMES[self.scheme]

    @property
    def label(self) -> str:
        """A short name: ``int8``, ``int4-g32``, ``int4-g32-asym``."""
        if self.scheme == "int8":
            return "int8"
        return f"int4-g{self.group_size}" + ("" if self.symmetric else "-asym")

    def to_metadata(self) -> dict[str, str]:
        return {QUANT_METADATA_KEY: json.dumps({**asdict(self), "modules": list(self.modules)})}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> "QuantScheme | None":
        """The scheme recorded in safetensors metadata, or None for a full-precision checkpoint."""
        if QUANT_METADATA_KEY not in metadata:
            return None
        try:
            d = json.loads(metadata[QUANT_METADATA_KEY])
            scheme = cls(d["scheme"], d["group_size"], bool(d["symmetric"]), tuple(d["modules"]))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise OpenGLMError(f"unreadable quantization metadata {metadata[QUANT_METADATA_KEY]!r}: {e}") from None
        _check(scheme.scheme, scheme.group_size)
        return scheme


def _check(scheme: str, group_size: int | None) -> None:
    if scheme not in SCHEMES:
        raise OpenGLMError(f"unknown quantization scheme {scheme!r} (known: {', '.join(SCHEMES)})")
    if scheme == "int4" and group_size not in GROUP_SIZES:
        raise OpenGLMError(f"INT4 group size must be one of {GROUP_SIZES}, got {group_size}")


def quantizable_modules(model: nn.Module, include_embeddings: bool, include_lm_head: bool) -> list[str]:
    """Names of the modules to quantize: every linear layer of the decoder and the routed experts of
    MoE layers, optionally the output layer and the token embeddings. Tied embeddings stay in full
    precision (one tensor serves both)."""
    tied = model.config.tie_word_embeddings
    names = []
    for name, module in model.named_modules():
        # Latent attention reads kv_b_proj's weight itself (absorbed into the query and output when decoding),
        # and the sparse-attention indexer chooses keys by ranking: both stay in full precision.
        if name.endswith(".self_attn.kv_b_proj") or ".self_attn.indexer." in name:
            continue
        if isinstance(module, Experts):
            names.append(name)
        elif isinstance(module, nn.Linear) and (name != "lm_head" or (include_lm_head and not tied)):
            names.append(name)
        elif isinstance(module, nn.Embedding) and include_embeddings and not tied:
            names.append(name)
    return names


def quantize_model(model: nn.Module, scheme: str, group_size: int | None = None, symmetric: bool = True,
                   include_embeddings: bool = False, include_lm_head: bool = True) -> nn.Module:
    """Quantize ``model``'s weights in place (CPU) and return it, with ``model.quantization`` set.

    ``scheme``: "int8" (per output channel, symmetric; ``group_size``/``symmetric`` ignored) or
    "int4" (groups of ``group_size`` in 32/64/128 along the input dimension, symmetric or
    asymmetric). Norms and biases stay in full precision. ``save_model`` then writes the scheme into
    the checkpoint metadata.
    """
    if getattr(model, "quantization", None) is not None:
        raise OpenGLMError(f"the model is already quantized ({model.quantization.label})")
    if scheme == "int8":
        group_size, symmetric = None, True
    _check(scheme, group_size)
    bits = SCHEMES[scheme]
    names = quantizable_modules(model, include_embeddings, include_lm_head)
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, nn.Embedding):
            new = QuantEmbedding.from_embedding(module, bits, group_size, symmetric)
        elif isinstance(module, Experts):
            new = QuantExperts.from_experts(module, bits, group_size, symmetric)
        else:
            new = QuantLinear.from_linear(module, bits, group_size, symmetric)
        model.set_submodule(name, new)
    model.quantization = QuantScheme(scheme, group_size, symmetric, tuple(names))
    return model


def build_quantized(model: nn.Module, scheme: QuantScheme) -> nn.Module:
    """Replace ``scheme.modules`` of an empty (meta-device) model by empty quantized modules to load into."""
    for name in scheme.modules:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise OpenGLMError(f"quantization metadata names {name!r}, which the model does not have") from None
        if isinstance(module, nn.Embedding):
            new = QuantEmbedding(module.num_embeddings, module.embedding_dim, scheme.bits, scheme.group_size,
                                 scheme.symmetric, module.weight.dtype)
        elif isinstance(module, Experts):
            E, twice_I, C = module.gate_up_proj.shape
            new = QuantExperts(E, C, twice_I // 2, scheme.bits, scheme.group_size, scheme.symmetric)
        else:
            new = QuantLinear(module.in_features, module.out_features, module.bias is not None, scheme.bits,
                              scheme.group_size, scheme.symmetric, module.weight.dtype)
        model.set_submodule(name, new)
    model.quantization = scheme
    return model
