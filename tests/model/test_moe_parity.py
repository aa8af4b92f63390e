"""GLM-4.5 mixture of experts (``glm4_moe``): same logits as ``transformers``, checkpoints both ways."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from openglm import Config, GLMForCausalLM, OpenGLMError, load_model, save_model  # noqa: E402
from padding import padded_logits  # noqa: E402

TOL = 1e-4

# Odd widths (the expert loop) and 16-byte aligned ones (grouped matmul); both with 3 groups of 4
# experts of which 2 are kept, a non-zero correction bias, q/k norms and a routed scale.
SHAPES = {
    "odd": dict(vocab_size=97, hidden_size=44, intermediate_size=52, moe_intermediate_size=20, num_attention_heads=3,
                num_key_value_heads=1, head_dim=12),
    "aligned": dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16),
}


def hf_moe(shape: str = "odd", seed: int = 0, **overrides):
    """A tiny random Glm4MoeForCausalLM built by transformers itself."""
    kwargs = dict(SHAPES[shape], num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=12,
                  num_experts_per_tok=3, n_group=3, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5,
                  norm_topk_prob=True, use_qk_norm=True, attention_bias=True, rms_norm_eps=1e-5,
                  max_position_embeddings=256, pad_token_id=0, eos_token_id=[1], num_nextn_predict_layers=0,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = transformers.Glm4MoeForCausalLM(transformers.Glm4MoeConfig(**kwargs))
    with torch.no_grad():  # the default init is too small for differences (or routing) to show
        for p in model.parameters():
            p.normal_(0, 0.3)
        for layer in model.model.layers[model.config.first_k_dense_replace:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.3)
    return model.eval()


@pytest.mark.parametrize("shape", ["odd", "aligned"])
def test_hf_checkpoint_loads_with_same_logits(tmp_path, shape):
    hf = hf_moe(shape)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    c = ours.config
    assert (c.model_type, c.num_experts, c.n_group, c.topk_group, c.first_k_dense_replace) == ("glm4_moe", 12, 3, 2, 1)
    assert not c.rotary_interleaved and c.use_qk_norm
    bias = ours.model.layers[2].mlp.gate.e_score_correction_bias
    assert bias.abs().sum() > 0 and torch.equal(bias, hf.model.layers[2].mlp.gate.e_score_correction_bias)
    ids = torch.randint(0, c.vocab_size, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() < TOL


def test_variants_without_qk_norm_renormalisation_or_groups(tmp_path):
    hf = hf_moe("odd", seed=3, use_qk_norm=False, norm_topk_prob=False, n_group=1, topk_group=1,
                routed_scaling_factor=1.0, first_k_dense_replace=2, n_shared_experts=2, attention_bias=False)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert not ours.config.use_qk_norm and ours.config.num_moe_layers == 1
    ids = torch.randint(0, 97, (1, 19), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() < TOL


def test_our_checkpoint_loads_in_transformers(tmp_path):
    config = Config.from_name("glm-4.5-debug", n_group=2, topk_group=1, eos_token_id=[1], pad_token_id=0)
    ours = GLMForCausalLM.from_config(config, seed=3)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.3)
        ours.model.layers[1].mlp.gate.e_score_correction_bias.normal_(0, 0.3)
    save_model(ours, tmp_path / "ckpt")
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.1.mlp.experts.7.up_proj.weight" in names and "model.layers.0.mlp.gate_proj.weight" in names
    assert not any(n.endswith("gate_up_proj") or "gate_up_proj.weight" in n for n in names)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert type(hf).__name__ == "Glm4MoeForCausalLM"
    ids = torch.randint(0, config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() < TOL
    back = load_model(tmp_path / "ckpt")  # and the round trip is exact
    for k, v in ours.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


@pytest.mark.parametrize("shape", ["odd", "aligned"])
def test_padded_batch_matches_transformers(tmp_path, shape):
    hf = hf_moe(shape, seed=4)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    V = ours.config.vocab_size
    ids = torch.randint(2, V, (3, 12), generator=torch.Generator().manual_seed(5))
    a, b, real = padded_logits(hf, ours, ids, [0, 5, 9])
    with torch.no_grad():
        alone = ours(ids[2:3, 9:])
    assert (a[real] - b[real]).abs().max().item() < TOL
    assert (alone[0] - b[2, 9:]).abs().max().item() < TOL  # padding rows never change a real row's experts


@pytest.mark.parametrize("shape", ["odd", "aligned"])
def test_kv_cache_decode_matches_transformers(tmp_path, shape):
    hf = hf_moe(shape, seed=6)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    ids = torch.randint(0, ours.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = hf(ids).logits
        cache = ours.new_cache(2, 32)
        steps = [ours(ids[:, :8], cache=cache)]  # prefill, then one token at a time
        steps += [ours(ids[:, t:t + 1], cache=cache) for t in range(8, 20)]
    assert (torch.cat(steps, 1) - full).abs().max().item() < TOL


def test_published_mtp_layer_is_skipped_and_router_stays_float32(tmp_path):
    hf = hf_moe("odd", seed=8)
    hf.save_pretrained(tmp_path)
    # The published checkpoints carry one multi-token-prediction layer after the last (transformers skips it).
    state = load_file(tmp_path / "model.safetensors")
    state["model.layers.3.eh_proj.weight"] = torch.zeros(44, 88)
    state["model.layers.3.mlp.experts.0.down_proj.weight"] = torch.zeros(44, 20)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours = load_model(tmp_path, dtype=torch.bfloat16)
    gate = ours.model.layers[1].mlp.gate
    assert gate.weight.dtype == gate.e_score_correction_bias.dtype == torch.float32
    assert ours.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16


def test_missing_or_misshapen_expert_is_a_clear_error(tmp_path):
    hf = hf_moe("odd", seed=9)
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    up = state.pop("model.layers.2.mlp.experts.5.up_proj.weight")
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(OpenGLMError, match="lacks 1 of the 24 pieces of model.layers.2.mlp.experts.gate_up_proj"):
        load_model(tmp_path)
    state["model.layers.2.mlp.experts.5.up_proj.weight"] = up[:-1]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(OpenGLMError, match=r"experts.5.up_proj.weight has shape \(19, 44\)"):
        load_model(tmp_path)
    state["model.layers.2.mlp.experts.5.up_proj.weight"] = up
    state["model.layers.2.mlp.experts.12.up_proj.weight"] = up.clone()
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(OpenGLMError, match="names expert 12, its config has 12"):
        load_model(tmp_path)


def test_config_json_round_trips_through_transformers(tmp_path):
    config = Config.from_name("glm-4.5-air-debug", n_group=4, topk_group=2, routed_scaling_factor=1.5)
    config.save(tmp_path)
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert (hf.model_type, hf.n_routed_experts, hf.n_group, hf.topk_group, hf.first_k_dense_replace) == ("glm4_moe", 8, 4, 2, 1)
    assert hf.routed_scaling_factor == 1.5 and hf.num_nextn_predict_layers == 0
    assert Config.from_file(tmp_path) == config
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["Glm4MoeForCausalLM"]


def test_truncated_or_foreign_moe_checkpoint_is_a_clear_error(tmp_path):
    hf_moe("odd", seed=10).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(OpenGLMError, match="cannot read .*model.safetensors"):
        load_model(tmp_path)
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(OpenGLMError, match="cannot read .*model.safetensors"):
        load_model(tmp_path)
