"""ChatGLM2/3 layout -> glm layout, checked against transformers' GlmForCausalLM on the same weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from openglm import OpenGLMError, load_model
from openglm.cli import main

transformers = pytest.importorskip("transformers")


def chatglm_checkpoint(directory, hf):
    """Write ``hf``'s weights the way a ChatGLM3 checkpoint stores them (fused qkv, ChatGLM names)."""
    c = hf.config
    sd = hf.state_dict()
    out = {"transformer.embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
           "transformer.encoder.final_layernorm.weight": sd["model.norm.weight"],
           "transformer.output_layer.weight": sd["lm_head.weight"],
           "transformer.rotary_pos_emb.inv_freq": torch.ones(8)}
    for i in range(c.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"self_attention.query_key_value.{kind}"] = torch.cat(
                [sd[src + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
        out[dst + "input_layernorm.weight"] = sd[src + "input_layernorm.weight"]
        out[dst + "post_attention_layernorm.weight"] = sd[src + "post_attention_layernorm.weight"]
        out[dst + "self_attention.dense.weight"] = sd[src + "self_attn.o_proj.weight"]
        out[dst + "mlp.dense_h_to_4h.weight"] = sd[src + "mlp.gate_up_proj.weight"]
        out[dst + "mlp.dense_4h_to_h.weight"] = sd[src + "mlp.down_proj.weight"]
    directory.mkdir()
    save_file({k: v.contiguous() for k, v in out.items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({
        "model_type": "chatglm", "padded_vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "ffn_hidden_size": c.intermediate_size, "num_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads, "multi_query_attention": True,
        "multi_query_group_num": c.num_key_value_heads, "kv_channels": c.head_dim, "layernorm_epsilon": c.rms_norm_eps,
        "rope_ratio": 2, "seq_length": 256, "add_qkv_bias": True, "rmsnorm": True, "eos_token_id": 2, "pad_token_id": 0,
    }))


def test_chatglm3_checkpoint_converts_to_identical_logits(tmp_path):
    cfg = transformers.GlmConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                                 pad_token_id=0, eos_token_id=[2],
                                 rope_parameters={"rope_type": "default", "rope_theta": 20000.0, "partial_rotary_factor": 0.5})
    torch.manual_seed(0)
    hf = transformers.GlmForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3)
    chatglm_checkpoint(tmp_path / "chatglm3", hf)
    assert main(["convert", str(tmp_path / "chatglm3"), "-o", str(tmp_path / "glm")]) == 0
    ours = load_model(tmp_path / "glm")
    assert ours.config.rope_theta == 20000.0
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max() < 1e-4


def test_convert_refuses_other_layouts(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "glm"}))
    with pytest.raises(OpenGLMError, match="not a ChatGLM checkpoint"):
        from openglm.model.convert import convert_chatglm

        convert_chatglm(tmp_path, tmp_path / "out")
