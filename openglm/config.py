"""Model configuration: one dataclass, a registry of named shapes, and the Hugging Face mapping.

A checkpoint directory holds the config as Hugging Face ``config.json`` (model type ``glm`` or
``glm4``), so the same file is read by ``transformers`` and by openglm. Fields that only openglm
understands (2D positions for the original GLM blank-infilling form) are written under their own
names, which ``transformers`` keeps as inert attributes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import OpenGLMError


@dataclass
class Config:
    name: str = "custom"
    vocab_size: int = 151552
    hidden_size: int = 4096
    intermediate_size: int = 13696
    num_layers: int = 40
    num_heads: int = 32
    num_kv_heads: int = 2
    head_dim: int = 128
    partial_rotary_factor: float = 0.5  # share of head_dim that is rotated (GLM-4: half)
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1.5625e-07
    attention_bias: bool = True  # bias on q/k/v, never on o_proj
    post_norms: bool = False  # GLM-4-0414 ("glm4"): extra norms after attention and MLP
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 131072
    initializer_range: float = 0.02
    # Original GLM blank infilling: position ids are [B, 2, T] (position in the corrupted text,
    # position inside the span); the second row rotates the head dims after the first rotary block.
    position_encoding_2d: bool = False
    pad_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    bos_token_id: int | None = None

    def __post_init__(self):
        if self.hidden_size <= 0 or self.num_layers <= 0 or self.vocab_size <= 0:
            raise OpenGLMError(f"config {self.name!r}: sizes must be positive")
        if self.num_heads % self.num_kv_heads:
            raise OpenGLMError(
                f"config {self.name!r}: num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if self.rotary_dim % 2:
            raise OpenGLMError(f"config {self.name!r}: rotary dim {self.rotary_dim} must be even")
        if self.position_encoding_2d and 2 * self.rotary_dim > self.head_dim:
            raise OpenGLMError(
                f"config {self.name!r}: 2D positions need two rotary blocks of {self.rotary_dim} "
                f"dims in a head of {self.head_dim}; use partial_rotary_factor <= 0.5"
            )
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def model_type(self) -> str:
        return "glm4" if self.post_norms else "glm"

    @property
    def num_parameters(self) -> int:
        d, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        q = self.num_heads * self.head_dim
        attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if self.attention_bias else 0)
        mlp = 3 * d * self.intermediate_size
        norms = (4 if self.post_norms else 2) * d
        per_layer = attn + mlp + norms
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + d

    # -- named configs -------------------------------------------------------------------------

    @classmethod
    def from_name(cls, name: str, **overrides) -> "Config":
        """A config from the registry by name (see ``openglm.config.CONFIGS``)."""
        if name not in CONFIGS:
            known = ", ".join(sorted(CONFIGS))
            raise OpenGLMError(f"unknown config name {name!r}; known configs: {known}")
        return dataclasses.replace(CONFIGS[name], **overrides)

    @classmethod
    def from_file(cls, path: str | Path) -> "Config":
        """Read a Hugging Face ``config.json`` (a file, or the checkpoint directory holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise OpenGLMError(f"no config.json at {path}")
        try:
            hf = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise OpenGLMError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf_dict(hf)

    # -- Hugging Face config.json --------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, hf: dict) -> "Config":
        model_type = hf.get("model_type")
        if model_type not in ("glm", "glm4"):
            raise OpenGLMError(
                f"config.json has model_type {model_type!r}; openglm reads 'glm' and 'glm4'"
                + (" (convert ChatGLM checkpoints with `openglm convert`)" if model_type == "chatglm" else "")
            )
        rope = hf.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", (hf.get("rope_scaling") or {}).get("rope_type", "default"))
        if rope_type != "default":
            raise OpenGLMError(f"rope type {rope_type!r} is not supported (only 'default')")
        # The MLP is always up * silu(gate); another activation would load and give wrong logits.
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise OpenGLMError(f"hidden_act {act!r} is not supported (only 'silu')")
        heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id")
        return cls(
            name=hf.get("openglm_name", "custom"),
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            partial_rotary_factor=rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5)),
            rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
            rms_norm_eps=hf.get("rms_norm_eps", 1.5625e-07),
            attention_bias=hf.get("attention_bias", True),
            post_norms=model_type == "glm4",
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            max_position_embeddings=hf.get("max_position_embeddings", 131072),
            initializer_range=hf.get("initializer_range", 0.02),
            position_encoding_2d=hf.get("position_encoding_2d", False),
            pad_token_id=hf.get("pad_token_id"),
            eos_token_id=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
            bos_token_id=hf.get("bos_token_id"),
        )

    def to_hf_dict(self, torch_dtype: str = "float32") -> dict:
        """``config.json``; ``torch_dtype`` is the dtype the model loads in by default."""
        arch = "Glm4ForCausalLM" if self.post_norms else "GlmForCausalLM"
        hf = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "tie_word_embeddings": self.tie_word_embeddings,
            # Both spellings: transformers >= 5 reads rope_parameters, 4.x the top-level keys.
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": self.rope_theta,
                "partial_rotary_factor": self.partial_rotary_factor,
            },
            "rope_theta": self.rope_theta,
            "partial_rotary_factor": self.partial_rotary_factor,
            "pad_token_id": self.pad_token_id,
            # null, not []: transformers' generate fails on an empty list of end tokens.
            "eos_token_id": list(self.eos_token_id) or None,
            "bos_token_id": self.bos_token_id,
            "torch_dtype": torch_dtype,
            "use_cache": True,
            "openglm_name": self.name,
        }
        if self.position_encoding_2d:
            hf["position_encoding_2d"] = True
        return hf

    def save(self, directory: str | Path, torch_dtype: str = "float32") -> None:
        from .utils import atomic_write_text

        text = json.dumps(self.to_hf_dict(torch_dtype), indent=2) + "\n"
        atomic_write_text(Path(directory) / "config.json", text)


def _register(*configs: Config) -> dict[str, Config]:
    return {c.name: c for c in configs}


def _debug(c: Config) -> Config:
    """The 2-layer, 64-wide sibling of a family, used by the tests."""
    return dataclasses.replace(
        c, name=f"{c.name}-debug", vocab_size=512, hidden_size=64, intermediate_size=128,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=1024,
    )


_GLM4_9B = Config(
    name="glm-4-9b", vocab_size=151552, hidden_size=4096, intermediate_size=13696, num_layers=40,
    num_heads=32, num_kv_heads=2, head_dim=128, max_position_embeddings=8192,
    pad_token_id=151329, eos_token_id=[151329, 151336, 151338],
)
_GLM4_9B_CHAT = dataclasses.replace(
    _GLM4_9B, name="glm-4-9b-chat", max_position_embeddings=131072, rope_theta=5_000_000.0,
)
_GLM4_9B_0414 = dataclasses.replace(
    _GLM4_9B, name="glm-4-9b-0414", post_norms=True, rms_norm_eps=1e-5, max_position_embeddings=32768,
)
_GLM4_32B_0414 = dataclasses.replace(
    _GLM4_9B_0414, name="glm-4-32b-0414", hidden_size=6144, intermediate_size=23040, num_layers=61,
    num_heads=48,
)
# ChatGLM2/3-6B shapes (their checkpoints convert to the `glm` layout with `openglm convert`).
_CHATGLM3_6B = Config(
    name="chatglm3-6b", vocab_size=65024, hidden_size=4096, intermediate_size=13696, num_layers=28,
    num_heads=32, num_kv_heads=2, head_dim=128, rms_norm_eps=1e-5, max_position_embeddings=8192,
    pad_token_id=0, eos_token_id=[2],
)
# Our bundled default: ~13M parameters, GLM-4 dense architecture, bilingual 16k vocabulary. Small
# on purpose: it is trained on two CPU cores, where a narrower model learns more per hour.
_GLM_TINY = Config(
    name="glm-tiny", vocab_size=16384, hidden_size=256, intermediate_size=768, num_layers=6,
    num_heads=4, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-5, max_position_embeddings=2048,
    post_norms=True,
)
# The original GLM blank-infilling form: same network, 2D positions.
_GLM_TINY_2D = dataclasses.replace(_GLM_TINY, name="glm-tiny-2d", post_norms=False, position_encoding_2d=True)
# ~100M parameters, the shape the benchmarks use.
_GLM4_100M = Config(
    name="glm-4-100m", vocab_size=32768, hidden_size=768, intermediate_size=2048, num_layers=12,
    num_heads=12, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-5, max_position_embeddings=4096,
    post_norms=True,
)

_FAMILIES = [_GLM4_9B, _GLM4_9B_CHAT, _GLM4_9B_0414, _GLM4_32B_0414, _CHATGLM3_6B, _GLM_TINY, _GLM_TINY_2D, _GLM4_100M]
CONFIGS: dict[str, Config] = _register(*_FAMILIES, *(_debug(c) for c in _FAMILIES))
