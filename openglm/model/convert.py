"""Converting other checkpoint layouts into ours (the Hugging Face ``glm`` layout).

ChatGLM2/ChatGLM3-6B (``model_type: chatglm``) is the same network as Hugging Face ``glm`` with a
fused query/key/value projection and other names. The map below is declarative: each template
names a source tensor and its destination; ``{i}`` is the layer index.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..config import Config
from ..errors import OpenGLMError
from .checkpoint import check_state_dict, read_safetensors, save_model, weight_files
from .glm import GLMForCausalLM

CHATGLM_TO_GLM = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.layers.{i}.input_layernorm.weight": "model.layers.{i}.input_layernorm.weight",
    "transformer.encoder.layers.{i}.self_attention.query_key_value.weight": "model.layers.{i}.self_attn.{q,k,v}_proj.weight",
    "transformer.encoder.layers.{i}.self_attention.query_key_value.bias": "model.layers.{i}.self_attn.{q,k,v}_proj.bias",
    "transformer.encoder.layers.{i}.self_attention.dense.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "transformer.encoder.layers.{i}.post_attention_layernorm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "transformer.encoder.layers.{i}.mlp.dense_h_to_4h.weight": "model.layers.{i}.mlp.gate_up_proj.weight",
    "transformer.encoder.layers.{i}.mlp.dense_4h_to_h.weight": "model.layers.{i}.mlp.down_proj.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}
CHATGLM_IGNORED = ("transformer.rotary_pos_emb.inv_freq",)


def chatglm_config(hf: dict) -> Config:
    """Our config from a ChatGLM2/3 ``config.json``."""
    if not hf.get("add_qkv_bias", True) or hf.get("apply_residual_connection_post_layernorm") or \
            not hf.get("rmsnorm", True) or hf.get("post_layer_norm") is False:
        raise OpenGLMError("only ChatGLM2/3-style configs (RMSNorm, pre-norm, qkv bias) convert to the glm layout")
    heads = hf["num_attention_heads"]
    eos = hf.get("eos_token_id", 2)
    return Config(
        name="converted-chatglm",
        vocab_size=hf["padded_vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["ffn_hidden_size"],
        num_layers=hf["num_layers"],
        num_heads=heads,
        num_kv_heads=hf["multi_query_group_num"] if hf.get("multi_query_attention") else heads,
        head_dim=hf.get("kv_channels") or hf["hidden_size"] // heads,
        rms_norm_eps=hf.get("layernorm_epsilon", 1e-5),
        rope_theta=10000.0 * hf.get("rope_ratio", 1),
        max_position_embeddings=hf.get("seq_length", 8192),
        pad_token_id=hf.get("pad_token_id"),
        eos_token_id=[eos] if isinstance(eos, int) else list(eos),
    )


def _template_regex(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


_CHATGLM_PATTERNS = [(_template_regex(src), dst) for src, dst in CHATGLM_TO_GLM.items()]


def chatglm_state_dict(state: dict[str, torch.Tensor], config: Config) -> dict[str, torch.Tensor]:
    """Rename a ChatGLM state dict to ours, splitting the fused query/key/value projection."""
    q_size = config.num_heads * config.head_dim
    kv_size = config.num_kv_heads * config.head_dim
    out = {}
    for name, t in state.items():
        if name in CHATGLM_IGNORED:
            continue
        for pattern, dst in _CHATGLM_PATTERNS:
            m = pattern.match(name)
            if m:
                dst = dst.replace("{i}", m.groupdict().get("i") or "")
                if "{q,k,v}" in dst:
                    for part, piece in zip("qkv", t.split([q_size, kv_size, kv_size], dim=0)):
                        out[dst.replace("{q,k,v}", part)] = piece.contiguous()
                else:
                    out[dst] = t
                break
        else:
            raise OpenGLMError(f"unknown tensor {name!r} in a ChatGLM checkpoint")
    return out


def convert_chatglm(src: str | Path, dst: str | Path) -> Path:
    """Convert a ChatGLM2/3 safetensors checkpoint directory into an openglm / HF ``glm`` one."""
    src = Path(src)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise OpenGLMError(f"no config.json in {src}")
    hf = json.loads(cfg_path.read_text(encoding="utf-8"))
    if hf.get("model_type") != "chatglm":
        raise OpenGLMError(f"{src} is not a ChatGLM checkpoint (model_type {hf.get('model_type')!r})")
    config = chatglm_config(hf)
    state, _ = read_safetensors(weight_files(src))
    state = chatglm_state_dict(state, config)
    with torch.device("meta"):
        model = GLMForCausalLM(config)
    check_state_dict(model, state, src)
    model.load_state_dict(state, assign=True)
    return save_model(model, dst)
