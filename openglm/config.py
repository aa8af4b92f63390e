"""Model configuration: one dataclass, a registry of named shapes, and the Hugging Face mapping.

A checkpoint directory holds the config as Hugging Face ``config.json`` (model type ``glm``,
``glm4``, ``glm4_moe``, ``glm4_moe_lite`` or ``glm_moe_dsa``), so the same file is read by ``transformers`` and by openglm. Fields that only openglm
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
    # Mixture of experts (HF ``glm4_moe``: GLM-4.5, 4.5-Air, 4.6, 4.7); ``num_experts == 0`` is a dense model.
    num_experts: int = 0  # routed experts per MoE layer (HF n_routed_experts)
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 1408  # width of each routed and shared expert
    num_shared_experts: int = 1  # always-on experts, run as one MLP of num_shared_experts x that width
    first_k_dense_replace: int = 1  # the first layers keep a dense MLP of intermediate_size
    n_group: int = 1  # experts are chosen inside the topk_group best of n_group groups
    topk_group: int = 1
    norm_topk_prob: bool = True  # the chosen experts' scores are renormalised to sum to 1
    routed_scaling_factor: float = 1.0
    use_qk_norm: bool = False  # RMSNorm over each query and key head before the rotation
    # Which layers hold the MoE block ("sparse") or a dense MLP ("dense"); None: from first_k_dense_replace.
    mlp_layer_types: list[str] | None = None
    # Multi-head latent attention (HF ``glm4_moe_lite``: GLM-4.7-Flash); ``kv_lora_rank == 0`` is GQA.
    kv_lora_rank: int = 0  # width of the joint key/value latent the cache stores
    q_lora_rank: int = 0  # width of the low-rank query (0: one full q_proj)
    qk_nope_head_dim: int = 0  # per-head query/key dims without positions
    qk_rope_head_dim: int = 0  # rotated dims, one rotary key shared by all heads
    v_head_dim: int = 0
    rope_interleave: bool = True  # rotate interleaved pairs (True) or the two halves of the rotary dims
    # DeepSeek sparse attention (HF ``glm_moe_dsa``: GLM-5), on top of MLA; ``index_topk == 0`` is dense.
    index_topk: int = 0  # keys each query attends to, chosen by the lightning indexer
    index_n_heads: int = 0
    index_head_dim: int = 0
    indexer_types: list[str] | None = None  # per layer: "full" runs its indexer, "shared" reuses the last one's choice

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
        if self.num_experts or self.use_qk_norm:
            self._check_moe()
        if self.kv_lora_rank:
            self._check_mla()

    def _check_moe(self):
        problem = None
        if not self.num_experts:
            problem = "use_qk_norm exists only in MoE (glm4_moe) models"
        elif self.post_norms or self.position_encoding_2d:
            problem = "MoE (glm4_moe) models have neither post_norms nor 2D positions"
        elif self.num_experts % self.n_group or self.num_experts // self.n_group < 2:
            problem = f"num_experts={self.num_experts} must split into n_group={self.n_group} groups of 2 or more"
        elif not 1 <= self.topk_group <= self.n_group:
            problem = f"topk_group={self.topk_group} must be between 1 and n_group={self.n_group}"
        elif not 1 <= self.num_experts_per_tok <= self.topk_group * (self.num_experts // self.n_group):
            problem = (f"num_experts_per_tok={self.num_experts_per_tok} must be between 1 and the "
                       f"{self.topk_group * (self.num_experts // self.n_group)} experts of the chosen groups")
        if problem:
            raise OpenGLMError(f"config {self.name!r}: {problem}")

    def _check_mla(self):
        problem = None
        n = self.num_layers
        if self.mlp_layer_types is None:
            self.mlp_layer_types = ["dense" if i < self.first_k_dense_replace or not self.num_experts else "sparse"
                                    for i in range(n)]
        if self.index_topk and self.indexer_types is None:
            self.indexer_types = ["full"] * n
        if min(self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim) <= 0 or self.q_lora_rank < 0:
            problem = "MLA needs positive qk_nope_head_dim, qk_rope_head_dim and v_head_dim"
        elif self.num_kv_heads != self.num_heads:
            problem = f"MLA has one key/value per query head: num_kv_heads={self.num_kv_heads} != num_heads={self.num_heads}"
        elif self.post_norms or self.position_encoding_2d or self.use_qk_norm or self.partial_rotary_factor != 1.0:
            problem = "MLA models have neither post_norms, 2D positions, q/k norms nor a partial rotary factor"
        elif len(self.mlp_layer_types) != n or set(self.mlp_layer_types) - {"dense", "sparse"}:
            problem = f"mlp_layer_types must give 'dense' or 'sparse' for each of the {n} layers"
        elif "sparse" in self.mlp_layer_types and not self.num_experts:
            problem = "mlp_layer_types has 'sparse' layers but num_experts is 0"
        elif self.index_topk:
            if not self.q_lora_rank or self.index_n_heads <= 0 or self.index_head_dim < self.qk_rope_head_dim:
                problem = "sparse attention needs q_lora_rank, index_n_heads and index_head_dim >= qk_rope_head_dim"
            elif len(self.indexer_types) != n or set(self.indexer_types) - {"full", "shared"} or self.indexer_types[0] != "full":
                problem = f"indexer_types must give 'full' or 'shared' for each of the {n} layers, the first 'full'"
        if problem:
            raise OpenGLMError(f"config {self.name!r}: {problem}")

    @property
    def rotary_dim(self) -> int:
        if self.kv_lora_rank:
            return self.qk_rope_head_dim
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def model_type(self) -> str:
        if self.kv_lora_rank:
            return "glm_moe_dsa" if self.index_topk else "glm4_moe_lite"
        return "glm4_moe" if self.num_experts else "glm4" if self.post_norms else "glm"

    @property
    def rotary_interleaved(self) -> bool:
        """GLM-4 dense rotates interleaved pairs ``(x[2i], x[2i+1])``; ``glm4_moe`` the two halves of the rotary dims."""
        if self.kv_lora_rank:
            return self.rope_interleave or bool(self.index_topk)
        return not self.num_experts

    def is_moe_layer(self, layer_idx: int) -> bool:
        if self.mlp_layer_types is not None:
            return self.mlp_layer_types[layer_idx] == "sparse"
        return bool(self.num_experts) and layer_idx >= self.first_k_dense_replace

    @property
    def kv_cache_width(self) -> int:
        """Numbers the attention cache holds per token in one layer: keys and values (GQA), or the
        latent and the rotary key (MLA; the sparse-attention indexer's keys are counted apart)."""
        if not self.kv_lora_rank:
            return 2 * self.num_kv_heads * self.head_dim
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def index_layers(self) -> list[int]:
        """The layers that run a sparse-attention indexer (and cache its keys)."""
        return [i for i, t in enumerate(self.indexer_types or []) if t == "full"] if self.index_topk else []

    @property
    def kv_cache_bytes_per_token(self) -> int:
        """Bytes of bf16 KV cache one token takes over all layers."""
        index = self.index_head_dim * len(self.index_layers)
        return 2 * (self.num_layers * self.kv_cache_width + index)

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_layers))

    @property
    def num_parameters(self) -> int:
        """Every parameter (the routers' correction biases are buffers, not counted)."""
        return self._count_parameters(self.num_experts)

    @property
    def num_active_parameters(self) -> int:
        """Parameters one token uses: all of a dense model; a MoE model's chosen and shared experts only."""
        return self._count_parameters(self.num_experts_per_tok if self.num_experts else 0)

    def _attention_parameters(self) -> int:
        d, H = self.hidden_size, self.num_heads
        if not self.kv_lora_rank:
            kv, q = self.num_kv_heads * self.head_dim, H * self.head_dim
            attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if self.attention_bias else 0)
            return attn + (2 * self.head_dim if self.use_qk_norm else 0)
        qk, r, qr = self.qk_nope_head_dim + self.qk_rope_head_dim, self.kv_lora_rank, self.q_lora_rank
        q = (d * qr + qr + qr * H * qk + (qr if self.attention_bias else 0)) if qr else d * H * qk
        kv = d * (r + self.qk_rope_head_dim) + r + r * H * (self.qk_nope_head_dim + self.v_head_dim)
        o = H * self.v_head_dim * d
        bias = (r + self.qk_rope_head_dim + d) if self.attention_bias else 0
        return q + kv + o + bias

    def _count_parameters(self, experts: int) -> int:
        d = self.hidden_size
        attn = self._attention_parameters()
        norms = (4 if self.post_norms else 2) * d
        moe_layers = self.num_moe_layers
        dense_mlp = 3 * d * self.intermediate_size
        moe_mlp = self.num_experts * d + (experts + self.num_shared_experts) * 3 * d * self.moe_intermediate_size
        layers = self.num_layers * (attn + norms) + (self.num_layers - moe_layers) * dense_mlp + moe_layers * moe_mlp
        if self.index_topk:  # wq_b, wk, k_norm (weight and bias), weights_proj of each full layer
            ih, id_ = self.index_n_heads, self.index_head_dim
            layers += len(self.index_layers) * (self.q_lora_rank * ih * id_ + d * id_ + 2 * id_ + d * ih)
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return layers + embed + d

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
        if model_type not in ("glm", "glm4", "glm4_moe", *_MLA_TYPES):
            raise OpenGLMError(
                f"config.json has model_type {model_type!r}; openglm reads 'glm', 'glm4', 'glm4_moe', "
                "'glm4_moe_lite' and 'glm_moe_dsa'"
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
        mla = _mla_from_hf(hf) if model_type in _MLA_TYPES else {}
        fields = dict(
            name=hf.get("openglm_name", "custom"),
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            partial_rotary_factor=rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0 if mla else 0.5)),
            rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
            rms_norm_eps=hf.get("rms_norm_eps", 1.5625e-07),
            attention_bias=hf.get("attention_bias", model_type in ("glm", "glm4")),
            post_norms=model_type == "glm4",
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            max_position_embeddings=hf.get("max_position_embeddings", 131072),
            initializer_range=hf.get("initializer_range", 0.02),
            position_encoding_2d=hf.get("position_encoding_2d", False),
            pad_token_id=hf.get("pad_token_id"),
            eos_token_id=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
            bos_token_id=hf.get("bos_token_id"),
        )
        if model_type in ("glm4_moe", *_MLA_TYPES):
            fields.update(_moe_from_hf(hf))
        return cls(**{**fields, **mla})

    def to_hf_dict(self, torch_dtype: str = "float32") -> dict:
        """``config.json``; ``torch_dtype`` is the dtype the model loads in by default."""
        arch = {"glm": "GlmForCausalLM", "glm4": "Glm4ForCausalLM", "glm4_moe": "Glm4MoeForCausalLM",
                "glm4_moe_lite": "Glm4MoeLiteForCausalLM", "glm_moe_dsa": "GlmMoeDsaForCausalLM"}[self.model_type]
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
        if self.num_experts:
            hf.update(_moe_to_hf(self))
        if self.kv_lora_rank:
            hf.update(_mla_to_hf(self))
        return hf

    def save(self, directory: str | Path, torch_dtype: str = "float32") -> None:
        from .utils import atomic_write_text

        text = json.dumps(self.to_hf_dict(torch_dtype), indent=2) + "\n"
        atomic_write_text(Path(directory) / "config.json", text)


# -- mixture of experts: the glm4_moe fields of config.json and the published shapes --------------

# (our field, HF glm4_moe key, transformers' default when config.json lacks the key)
_MOE_HF_FIELDS = (
    ("num_experts", "n_routed_experts", 128),
    ("num_experts_per_tok", "num_experts_per_tok", 8),
    ("moe_intermediate_size", "moe_intermediate_size", 1408),
    ("num_shared_experts", "n_shared_experts", 1),
    ("first_k_dense_replace", "first_k_dense_replace", 1),
    ("n_group", "n_group", 1),
    ("topk_group", "topk_group", 1),
    ("norm_topk_prob", "norm_topk_prob", True),
    ("routed_scaling_factor", "routed_scaling_factor", 1.0),
    ("use_qk_norm", "use_qk_norm", False),
)


def _moe_from_hf(hf: dict) -> dict:
    return {ours: hf.get(key, default) for ours, key, default in _MOE_HF_FIELDS}


def _moe_to_hf(c: Config) -> dict:
    # The published checkpoints carry a multi-token-prediction layer after the last one; openglm neither
    # runs nor keeps it, so what it writes declares none.
    return {**{key: getattr(c, ours) for ours, key, _ in _MOE_HF_FIELDS}, "num_nextn_predict_layers": 0}


# -- multi-head latent attention and sparse attention: glm4_moe_lite / glm_moe_dsa fields -----------

_MLA_TYPES = ("glm4_moe_lite", "glm_moe_dsa")
# (our field, HF key, transformers' default when config.json lacks the key); the DSA keys only for glm_moe_dsa.
_MLA_HF_FIELDS = (
    ("kv_lora_rank", "kv_lora_rank", 512),
    ("qk_nope_head_dim", "qk_nope_head_dim", 192),
    ("qk_rope_head_dim", "qk_rope_head_dim", 64),
    ("v_head_dim", "v_head_dim", 256),
    ("rope_interleave", "rope_interleave", True),
    ("mlp_layer_types", "mlp_layer_types", None),
)
_DSA_HF_FIELDS = (
    ("index_topk", "index_topk", 2048),
    ("index_n_heads", "index_n_heads", 32),
    ("index_head_dim", "index_head_dim", 128),
    ("indexer_types", "indexer_types", None),
)


def _mla_from_hf(hf: dict) -> dict:
    dsa = hf["model_type"] == "glm_moe_dsa"
    out = {ours: hf.get(key, default) for ours, key, default in _MLA_HF_FIELDS + (_DSA_HF_FIELDS if dsa else ())}
    # transformers names head_dim the rotary width here; ours is a query/key head's full width.
    out["head_dim"] = out["qk_nope_head_dim"] + out["qk_rope_head_dim"]
    out["q_lora_rank"] = hf.get("q_lora_rank", 2048 if dsa else 768) or 0
    out["num_kv_heads"] = hf["num_attention_heads"]
    if out["mlp_layer_types"] is None:  # transformers' defaults: lite one dense layer, DSA first_k_dense_replace
        dense = hf.get("first_k_dense_replace", 3) if dsa else 1
        out["mlp_layer_types"] = ["dense" if i < dense else "sparse" for i in range(hf["num_hidden_layers"])]
    if dsa and out["indexer_types"] is None:  # derived from a pattern or a frequency/offset, as transformers does
        pattern = hf.get("index_topk_pattern")
        if pattern is not None:
            out["indexer_types"] = [{"F": "full", "S": "shared"}[c] for c in pattern] if isinstance(pattern, str) else list(pattern)
        else:
            freq, offset = max(hf.get("index_topk_freq", 1), 1), hf.get("index_skip_topk_offset", 2)
            out["indexer_types"] = ["full" if max(i - offset + 1, 0) % freq == 0 else "shared"
                                    for i in range(hf["num_hidden_layers"])]
    return out


def _mla_to_hf(c: Config) -> dict:
    fields = _MLA_HF_FIELDS + (_DSA_HF_FIELDS if c.index_topk else ())
    hf = {key: getattr(c, ours) for ours, key, _ in fields}
    hf.update(q_lora_rank=c.q_lora_rank or None, head_dim=c.qk_rope_head_dim, num_key_value_heads=c.num_heads,
              qk_head_dim=c.qk_nope_head_dim + c.qk_rope_head_dim)
    if c.index_topk:
        hf["layer_types"] = ["indexed_attention"] * c.num_layers
    return hf


# Published config.json of the zai-org checkpoints (the MTP layer left out, see _moe_to_hf).
_GLM45 = Config(
    name="glm-4.5", vocab_size=151552, hidden_size=5120, intermediate_size=12288, num_layers=92,
    num_heads=96, num_kv_heads=8, head_dim=128, rope_theta=1_000_000.0, rms_norm_eps=1e-5,
    max_position_embeddings=131072, pad_token_id=151329, eos_token_id=[151329, 151336, 151338],
    num_experts=160, num_experts_per_tok=8, moe_intermediate_size=1536, num_shared_experts=1,
    first_k_dense_replace=3, routed_scaling_factor=2.5, use_qk_norm=True,
)
_GLM45_AIR = dataclasses.replace(
    _GLM45, name="glm-4.5-air", hidden_size=4096, intermediate_size=10944, num_layers=46, num_experts=128,
    moe_intermediate_size=1408, first_k_dense_replace=1, routed_scaling_factor=1.0, use_qk_norm=False,
)
_GLM46 = dataclasses.replace(_GLM45, name="glm-4.6", max_position_embeddings=202752)
_GLM47 = dataclasses.replace(_GLM46, name="glm-4.7")
# GLM-4.7-Flash (glm4_moe_lite, 30B total / ~3B active) and GLM-5 (glm_moe_dsa, 744B / 40B active).
_GLM47_FLASH = Config(
    name="glm-4.7-flash", vocab_size=154880, hidden_size=2048, intermediate_size=10240, num_layers=47,
    num_heads=20, num_kv_heads=20, head_dim=256, partial_rotary_factor=1.0, rope_theta=1_000_000.0,
    rms_norm_eps=1e-5, attention_bias=False, max_position_embeddings=202752, pad_token_id=154820,
    eos_token_id=[154820, 154827, 154829], num_experts=64, num_experts_per_tok=4, moe_intermediate_size=1536,
    num_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=1.8,
    kv_lora_rank=512, q_lora_rank=768, qk_nope_head_dim=192, qk_rope_head_dim=64, v_head_dim=256,
)
_GLM5 = dataclasses.replace(
    _GLM47_FLASH, name="glm-5", hidden_size=6144, intermediate_size=12288, num_layers=78, num_heads=64,
    num_kv_heads=64, num_experts=256, num_experts_per_tok=8, moe_intermediate_size=2048, first_k_dense_replace=3,
    routed_scaling_factor=2.5, q_lora_rank=2048, mlp_layer_types=None,
    index_topk=2048, index_n_heads=32, index_head_dim=128,
)
_MOE_FAMILIES = [_GLM45, _GLM45_AIR, _GLM46, _GLM47, _GLM47_FLASH, _GLM5]


def _register(*configs: Config) -> dict[str, Config]:
    return {c.name: c for c in configs}


def _debug(c: Config) -> Config:
    """The 2-layer, 64-wide sibling of a family, used by the tests (MoE: one dense layer, one of 8 experts)."""
    moe = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1) if c.num_experts else {}
    # MLA: latent 32 + rotary 8 per token; sparse attention keeps the 8 best keys of each query.
    mla = dict(num_kv_heads=4, head_dim=24, kv_lora_rank=32, q_lora_rank=24 if c.q_lora_rank else 0, qk_nope_head_dim=16,
               qk_rope_head_dim=8, v_head_dim=16, mlp_layer_types=None, indexer_types=None,
               **(dict(index_topk=8, index_n_heads=4, index_head_dim=16) if c.index_topk else {})) if c.kv_lora_rank else {}
    return dataclasses.replace(
        c, name=f"{c.name}-debug", vocab_size=512, hidden_size=64, intermediate_size=128,
        **{**dict(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=1024, **moe), **mla},
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
# glm-tiny's mixture-of-experts sibling (glm4_moe): the same width, depth, attention and vocabulary, and
# the same 13.1M active parameters per token (one dense layer, then 16 routed experts, top-2, plus a
# shared expert, each a third of glm-tiny's MLP width), 27M in all.
_GLM_TINY_MOE = dataclasses.replace(
    _GLM_TINY, name="glm-tiny-moe", post_norms=False, num_experts=16, num_experts_per_tok=2,
    moe_intermediate_size=256, num_shared_experts=1, first_k_dense_replace=1,
)
# ~100M parameters, the shape the benchmarks use.
_GLM4_100M = Config(
    name="glm-4-100m", vocab_size=32768, hidden_size=768, intermediate_size=2048, num_layers=12,
    num_heads=12, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-5, max_position_embeddings=4096,
    post_norms=True,
)

_FAMILIES = [_GLM4_9B, _GLM4_9B_CHAT, _GLM4_9B_0414, _GLM4_32B_0414, _CHATGLM3_6B, _GLM_TINY, _GLM_TINY_2D, _GLM_TINY_MOE, _GLM4_100M,
             *_MOE_FAMILIES]
CONFIGS: dict[str, Config] = _register(*_FAMILIES, *(_debug(c) for c in _FAMILIES))
