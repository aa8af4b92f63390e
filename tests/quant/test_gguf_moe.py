"""GGUF export of GLM-4.5 MoE (``glm4_moe``): llama.cpp's glm4moe names, shapes and metadata, read back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from openglm import Config, GLMForCausalLM, load_model, save_model
from openglm.errors import OpenGLMError
from openglm.quant.gguf import export_gguf
from llama_runs import assert_llama_cpp_runs_like_openglm

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory, tokenizer):
    config = Config.from_name("glm-4.5-debug", vocab_size=tokenizer.vocab_size, eos_token_id=[tokenizer.eos_id],
                              pad_token_id=tokenizer.eos_id)
    model = GLMForCausalLM.from_config(config, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(10)
        model.model.layers[1].mlp.gate.e_score_correction_bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    return save_model(model, tmp_path_factory.mktemp("moe-gguf") / "moe", tokenizer=tokenizer)


def _field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize("out_type,atol", [("f32", 0.0), ("q8_0", 0.05), ("q4_0", 0.6)])
def test_moe_export_reads_back(moe_checkpoint, tmp_path, out_type, atol):
    reader = gguf.GGUFReader(str(export_gguf(moe_checkpoint, tmp_path / "m.gguf", out_type)))
    model = load_model(moe_checkpoint)
    c = model.config
    assert _field(reader, "general.architecture") == "glm4moe"
    for key, value in (("expert_count", c.num_experts), ("expert_used_count", c.num_experts_per_tok),
                       ("expert_shared_count", 1), ("expert_feed_forward_length", c.moe_intermediate_size),
                       ("leading_dense_block_count", 1), ("feed_forward_length", c.intermediate_size),
                       ("expert_gating_func", gguf.ExpertGatingFuncType.SIGMOID), ("expert_weights_norm", True),
                       ("rope.dimension_count", c.rotary_dim), ("nextn_predict_layers", 0)):
        assert _field(reader, f"glm4moe.{key}") == value, key
    assert _field(reader, "glm4moe.expert_weights_scale") == pytest.approx(2.5)

    tensors = {t.name: t for t in reader.tensors}
    allowed = {name.format(bid=b) for name in (gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.GLM4_MOE])
               for b in range(c.num_layers)}
    assert {n.rsplit(".", 1)[0] for n in tensors} <= allowed  # llama.cpp's names only
    assert "blk.0.ffn_gate.weight" in tensors and "blk.1.ffn_gate.weight" not in tensors  # one dense layer
    state = model.state_dict()
    E, I = c.num_experts, c.moe_intermediate_size
    experts = "model.layers.1.mlp.experts"
    for gguf_name, expected in (
            ("blk.1.ffn_gate_exps.weight", state[f"{experts}.gate_up_proj"][:, :I]),
            ("blk.1.ffn_up_exps.weight", state[f"{experts}.gate_up_proj"][:, I:]),
            ("blk.1.ffn_down_exps.weight", state[f"{experts}.down_proj"]),
            ("blk.1.ffn_up_shexp.weight", state["model.layers.1.mlp.shared_experts.gate_up_proj.weight"][I:]),
            ("blk.0.ffn_gate.weight", state["model.layers.0.mlp.gate_up_proj.weight"][:c.intermediate_size]),
            ("blk.1.ffn_gate_inp.weight", state["model.layers.1.mlp.gate.weight"]),
            ("blk.1.exp_probs_b.bias", state["model.layers.1.mlp.gate.e_score_correction_bias"]),
            ("blk.1.attn_q_norm.weight", state["model.layers.1.self_attn.q_norm.weight"]),
            ("blk.1.post_attention_norm.weight", state["model.layers.1.post_attention_layernorm.weight"])):
        t = tensors[gguf_name]
        expected = expected.float().numpy()
        assert tuple(int(d) for d in reversed(t.shape)) == expected.shape, gguf_name  # GGUF lists dims innermost first
        full = expected.ndim == 1 or "ffn_gate_inp" in gguf_name  # norms, biases and the router stay f32
        assert t.tensor_type == (gguf.GGMLQuantizationType.F32 if full or out_type == "f32"
                                 else getattr(gguf.GGMLQuantizationType, out_type.upper())), gguf_name
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(expected.shape)
        assert np.abs(got - expected).max() <= (0 if full else atol) * np.abs(expected).max() + 1e-6, gguf_name
    assert E == tensors["blk.1.ffn_gate_exps.weight"].shape[-1]


def test_group_limited_routing_is_refused(moe_checkpoint, tmp_path):
    import json
    import shutil

    ckpt = shutil.copytree(moe_checkpoint, tmp_path / "grouped")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(n_group=2, topk_group=1)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(OpenGLMError, match="n_group=2"):
        export_gguf(ckpt, tmp_path / "g.gguf")


def test_llama_cpp_runs_the_moe_export_like_openglm(moe_checkpoint, tokenizer, tmp_path):
    assert_llama_cpp_runs_like_openglm(moe_checkpoint, tokenizer, tmp_path)
