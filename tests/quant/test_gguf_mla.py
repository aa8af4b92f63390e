"""GGUF export of GLM-4.7-Flash (``glm4_moe_lite`` -> llama.cpp's ``deepseek2``) and GLM-5 (``glm_moe_dsa`` ->
``glm-dsa``): names, shapes, values and metadata read back with gguf's reader; rotary layouts checked by scoring
with llama.cpp's rotations; where llama-cpp-python is installed, llama.cpp runs the exports."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from openglm import Config, GLMForCausalLM, load_model, save_model
from openglm.errors import OpenGLMError
from openglm.model.glm import rotary_cos_sin
from openglm.quant.gguf import export_gguf
from llama_runs import assert_llama_cpp_runs_like_openglm

gguf = pytest.importorskip("gguf")

ARCH = {"glm-4.7-flash-debug": ("deepseek2", gguf.MODEL_ARCH.DEEPSEEK2), "glm-5-debug": ("glm-dsa", gguf.MODEL_ARCH.GLM_DSA)}


def _checkpoint(directory, tokenizer, name, **overrides):
    config = Config.from_name(name, vocab_size=tokenizer.vocab_size, eos_token_id=[tokenizer.eos_id],
                              pad_token_id=tokenizer.eos_id, **overrides)
    model = GLMForCausalLM.from_config(config, seed=0)
    generator = torch.Generator().manual_seed(0)  # the same weights every run: no near-tie left to chance
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3, generator=generator)  # norms and the indexer's LayerNorm bias too, so a misplaced row shows
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1, generator=generator)
    return save_model(model, directory, tokenizer=tokenizer)


# Shapes llama.cpp runs: it turns the indexer's queries and keys by a Hadamard matrix of 64 or more dims
# (scores unchanged), so the indexer head needs a multiple of 64 dims (GLM-5 has 128). Every export here uses them.
RUNNABLE = {"glm-4.7-flash-debug": {}, "glm-5-debug": {"index_head_dim": 64, "qk_rope_head_dim": 16}}


@pytest.fixture(scope="module", params=list(ARCH))
def latent_checkpoint(request, tmp_path_factory, tokenizer):
    name = request.param
    return name, _checkpoint(tmp_path_factory.mktemp("mla-gguf") / name, tokenizer, name, **RUNNABLE[name])


def _field(reader, key):
    return reader.fields[key].contents()


def _array(tensors, name, shape):
    t = tensors[name]
    assert tuple(int(d) for d in reversed(t.shape)) == shape, name  # GGUF lists dims innermost first
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)


@pytest.mark.parametrize("out_type,atol", [("f32", 0.0), ("q8_0", 0.05)])
def test_latent_export_reads_back(latent_checkpoint, tmp_path, out_type, atol):
    name, ckpt = latent_checkpoint
    arch_name, arch = ARCH[name]
    reader = gguf.GGUFReader(str(export_gguf(ckpt, tmp_path / "m.gguf", out_type)))
    c = load_model(ckpt).config
    state = load_model(ckpt).state_dict()
    H, dn, dr, dv, r = c.num_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
    assert _field(reader, "general.architecture") == arch_name
    expected = {"attention.head_count": H, "attention.head_count_kv": 1, "attention.q_lora_rank": c.q_lora_rank,
                "attention.kv_lora_rank": r, "attention.key_length": r + dr, "attention.value_length": r,
                "attention.key_length_mla": dn + dr, "attention.value_length_mla": dv, "rope.dimension_count": dr,
                "leading_dense_block_count": 1, "expert_count": c.num_experts, "expert_used_count": c.num_experts_per_tok,
                "expert_shared_count": 1, "expert_feed_forward_length": c.moe_intermediate_size,
                "expert_gating_func": gguf.ExpertGatingFuncType.SIGMOID, "expert_weights_norm": True,
                "vocab_size": c.vocab_size, "block_count": c.num_layers}
    if c.index_topk:
        expected.update({"attention.indexer.head_count": c.index_n_heads, "attention.indexer.key_length": c.index_head_dim,
                         "attention.indexer.top_k": c.index_topk})
    for key, value in expected.items():
        assert _field(reader, f"{arch_name}.{key}") == value, key
    assert _field(reader, f"{arch_name}.expert_weights_scale") == pytest.approx(c.routed_scaling_factor)

    tensors = {t.name: t for t in reader.tensors}
    allowed = {n.format(bid=b) for n in (gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch]) for b in range(c.num_layers)}
    assert {n.rsplit(".", 1)[0] for n in tensors} <= allowed  # llama.cpp's names only
    assert "blk.0.attn_kv_b.weight" not in tensors  # split into k_b / v_b, as llama.cpp's absorbed attention reads it
    assert ("blk.1.indexer.attn_k.weight" in tensors) == bool(c.index_topk)
    attn = "model.layers.1.self_attn"
    kv_b = state[f"{attn}.kv_b_proj.weight"].view(H, dn + dv, r)
    checks = [("blk.1.attn_k_b.weight", kv_b[:, :dn].transpose(1, 2)), ("blk.1.attn_v_b.weight", kv_b[:, dn:]),
              ("blk.1.attn_q_a.weight", state[f"{attn}.q_a_proj.weight"]),
              ("blk.1.attn_q_b.weight", state[f"{attn}.q_b_proj.weight"]),  # interleaved rotary: a plain copy
              ("blk.1.attn_kv_a_mqa.weight", state[f"{attn}.kv_a_proj_with_mqa.weight"]),
              ("blk.1.attn_q_a_norm.weight", state[f"{attn}.q_a_layernorm.weight"]),
              ("blk.1.attn_kv_a_norm.weight", state[f"{attn}.kv_a_layernorm.weight"]),
              ("blk.1.attn_output.weight", state[f"{attn}.o_proj.weight"]),
              ("blk.1.ffn_gate_inp.weight", state["model.layers.1.mlp.gate.weight"]),
              ("blk.1.exp_probs_b.bias", state["model.layers.1.mlp.gate.e_score_correction_bias"]),
              ("blk.1.ffn_down_exps.weight", state["model.layers.1.mlp.experts.down_proj"]),
              ("blk.0.ffn_gate.weight", state["model.layers.0.mlp.gate_up_proj.weight"][:c.intermediate_size])]
    if c.index_topk:  # the indexer rotates interleaved pairs like llama.cpp's: plain copies
        checks += [("blk.1.indexer.proj.weight", state[f"{attn}.indexer.weights_proj.weight"]),
                   ("blk.1.indexer.attn_q_b.weight", state[f"{attn}.indexer.wq_b.weight"]),
                   ("blk.1.indexer.attn_k.weight", state[f"{attn}.indexer.wk.weight"]),
                   ("blk.1.indexer.k_norm.weight", state[f"{attn}.indexer.k_norm.weight"]),
                   ("blk.1.indexer.k_norm.bias", state[f"{attn}.indexer.k_norm.bias"])]
    for gguf_name, want in checks:
        want = want.float().numpy()
        t = tensors[gguf_name]
        small = want.ndim == 1 or "ffn_gate_inp" in gguf_name
        quantizable = want.shape[-1] % 32 == 0
        assert t.tensor_type == (gguf.GGMLQuantizationType.F32 if small or out_type == "f32" else
                                 gguf.GGMLQuantizationType.Q8_0 if quantizable else gguf.GGMLQuantizationType.F16), gguf_name
        got = _array(tensors, gguf_name, want.shape)
        tol = 0 if small or out_type == "f32" else atol if quantizable else 1e-3
        assert np.abs(got - want).max() <= tol * np.abs(want).max() + 1e-6, gguf_name


def _rope(x, pos, pairs, base):
    """llama.cpp's rotations of the rotary dims (last axis) at position ``pos``: "normal" rotates pairs
    ``(x[2i], x[2i+1])``, "neox" the halves ``(x[i], x[i + n/2])``; both by ``pos * base^(-2i/n)``."""
    n = x.shape[-1]
    theta = pos * base ** (-np.arange(0, n, 2) / n)
    cos, sin = np.cos(theta), np.sin(theta)
    a, b = (x[..., 0::2], x[..., 1::2]) if pairs else (x[..., : n // 2], x[..., n // 2:])
    ra, rb = a * cos - b * sin, a * sin + b * cos
    return np.stack((ra, rb), axis=-1).reshape(x.shape) if pairs else np.concatenate((ra, rb), axis=-1)


def test_half_split_rotary_is_regrouped_into_llama_cpp_pairs(tmp_path, tokenizer):
    """A checkpoint that rotates halves (``rope_interleave=False``): llama.cpp's pairwise rotation of the
    exported rows gives the same rotary query-key scores as the half-split rotation of ours."""
    ckpt = _checkpoint(tmp_path / "halves", tokenizer, "glm-4.7-flash-debug", rope_interleave=False)
    c = load_model(ckpt).config
    assert not c.rotary_interleaved
    state = {k: v.float().numpy() for k, v in load_model(ckpt).state_dict().items()}
    reader = gguf.GGUFReader(str(export_gguf(ckpt, tmp_path / "h.gguf", "f32")))
    tensors = {t.name: t for t in reader.tensors}
    H, dn, dr, r = c.num_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.kv_lora_rank
    ours_q = state["model.layers.0.self_attn.q_b_proj.weight"]
    ours_kv = state["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
    theirs_q = _array(tensors, "blk.0.attn_q_b.weight", ours_q.shape)
    theirs_kv = _array(tensors, "blk.0.attn_kv_a_mqa.weight", ours_kv.shape)
    assert not np.array_equal(theirs_q, ours_q)  # the rotary rows moved ...
    assert np.array_equal(theirs_q.reshape(H, dn + dr, -1)[:, :dn], ours_q.reshape(H, dn + dr, -1)[:, :dn])  # ... only they

    rng = np.random.default_rng(0)
    q_latent, x = rng.normal(size=(4, c.q_lora_rank)), rng.normal(size=(4, c.hidden_size))
    positions = np.array([0, 3, 17, 250])

    def scores(wq, wkv, pairs):
        q = _rope((q_latent @ wq.T).reshape(4, H, dn + dr)[..., dn:], positions[:, None, None], pairs, c.rope_theta)
        k = _rope((x @ wkv.T)[:, r:], positions[:, None], pairs, c.rope_theta)
        return np.einsum("thd,sd->hts", q, k)

    # Ours: the model's own rotation of the same rows.
    attn = load_model(ckpt).double().model.layers[0].self_attn
    rotations = [rotary_cos_sin(torch.tensor(positions)[None], dr, c.rope_theta, torch.float64)]
    q = torch.from_numpy((q_latent @ ours_q.T).reshape(4, H, dn + dr)[..., dn:]).transpose(0, 1)[None]
    k = torch.from_numpy((x @ ours_kv.T)[:, r:])[None, None]
    ours = torch.einsum("htd,sd->hts", attn._rotate(q, rotations)[0], attn._rotate(k, rotations)[0, 0]).numpy()
    theirs = scores(theirs_q, theirs_kv, pairs=True)
    # The model's angles are float32, the reference's float64: equal to 1e-4; the regrouping itself is exact.
    assert np.abs(ours - theirs).max() < 1e-4 * np.abs(ours).max()
    assert np.abs(scores(ours_q, ours_kv, pairs=False) - theirs).max() < 1e-9 * np.abs(ours).max()
    assert np.abs(ours - scores(theirs_q, theirs_kv, pairs=False)).max() > 1e-3  # the regrouping matters


def test_indexer_rotates_in_llama_cpp_pairs_like_ours(tmp_path, tokenizer):
    """GLM-5's indexer rotates interleaved pairs, as llama.cpp's glm-dsa indexer does ("normal" rope):
    its tensors are plain copies, and llama.cpp's rotation of them gives the model's own index scores."""
    ckpt = _checkpoint(tmp_path / "dsa", tokenizer, "glm-5-debug", **RUNNABLE["glm-5-debug"])
    c = load_model(ckpt).config
    state = {k: v.float().numpy() for k, v in load_model(ckpt).state_dict().items()}
    reader = gguf.GGUFReader(str(export_gguf(ckpt, tmp_path / "d.gguf", "f32")))
    tensors = {t.name: t for t in reader.tensors}
    Hi, D, dr = c.index_n_heads, c.index_head_dim, c.qk_rope_head_dim
    pre = "model.layers.1.self_attn.indexer"
    ours = [state[f"{pre}.{n}"] for n in ("wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias")]
    theirs = [_array(tensors, f"blk.1.indexer.{n}", w.shape)
              for n, w in zip(("attn_q_b.weight", "attn_k.weight", "k_norm.weight", "k_norm.bias"), ours)]
    for a, b in zip(ours, theirs):
        assert np.array_equal(a, b)

    rng = np.random.default_rng(1)
    q_latent, x = rng.normal(size=(5, c.q_lora_rank)), rng.normal(size=(5, c.hidden_size))
    positions = np.array([0, 1, 9, 40, 300])

    def scores(wq, wk, gamma, beta, pairs):
        q = (q_latent @ wq.T).reshape(5, Hi, D)
        k = x @ wk.T
        k = (k - k.mean(-1, keepdims=True)) / np.sqrt(k.var(-1, keepdims=True) + 1e-6) * gamma + beta
        q = np.concatenate((_rope(q[..., :dr], positions[:, None, None], pairs, c.rope_theta), q[..., dr:]), -1)
        k = np.concatenate((_rope(k[..., :dr], positions[:, None], pairs, c.rope_theta), k[..., dr:]), -1)
        return np.einsum("thd,sd->hts", q, k)

    # Ours: the model's own indexer (projections, key LayerNorm, rotation) on the same inputs.
    indexer = load_model(ckpt).double().model.layers[1].self_attn.indexer
    rotations = [rotary_cos_sin(torch.tensor(positions)[None], dr, c.rope_theta, torch.float64)]
    with torch.no_grad():
        q = indexer._rotate(indexer.wq_b(torch.from_numpy(q_latent)).view(5, Hi, D).transpose(0, 1)[None], rotations)
        k = indexer._rotate(indexer.k_norm(indexer.wk(torch.from_numpy(x)))[None, None], rotations)
    want = torch.einsum("htd,sd->hts", q[0], k[0, 0]).numpy()
    # The model's angles are float32, the reference's float64: equal to 1e-4.
    assert np.abs(want - scores(*theirs, pairs=True)).max() < 1e-4 * np.abs(want).max()
    assert np.abs(want - scores(*theirs, pairs=False)).max() > 1e-3  # the other rotation would not match


@pytest.mark.parametrize("name,overrides,message", [
    ("glm-4.7-flash-debug", dict(attention_bias=True), "no projection biases"),
    ("glm-4.7-flash-debug", dict(mlp_layer_types=["sparse", "dense"]), "dense MLP layers first"),
    ("glm-5-debug", dict(indexer_types=["full", "shared"]), "'shared' layers"),
    ("glm-5-debug", dict(n_group=2, topk_group=1), "n_group=2"),
    ("glm-5-debug", dict(max_position_embeddings=1 << 20), "shared indexer layers"),
    ("glm-5-debug", dict(index_head_dim=48), "multiple of 64"),
])
def test_what_llama_cpp_cannot_represent_is_refused(tmp_path, tokenizer, name, overrides, message):
    ckpt = _checkpoint(tmp_path / "ckpt", tokenizer, name, **{**RUNNABLE[name], **overrides})
    with pytest.raises(OpenGLMError, match=message):
        export_gguf(ckpt, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf*"))  # nothing half-written left behind


def test_cli_converts_glm_4_7_flash(latent_checkpoint, tmp_path):
    from openglm.cli import main

    name, ckpt = latent_checkpoint
    out = tmp_path / "cli.gguf"
    assert main(["convert", str(ckpt), "--to", "gguf", "--gguf-type", "q8_0", "-o", str(out)]) == 0
    assert _field(gguf.GGUFReader(str(out)), "general.architecture") == ARCH[name][0]


@pytest.mark.parametrize("name", list(RUNNABLE))
def test_llama_cpp_runs_the_latent_export_like_openglm(name, tokenizer, tmp_path):
    assert_llama_cpp_runs_like_openglm(_checkpoint(tmp_path / name, tokenizer, name, **RUNNABLE[name]), tokenizer, tmp_path)
