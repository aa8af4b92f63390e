"""GLM-4.7-Flash (``glm4_moe_lite``, multi-head latent attention) and GLM-5 (``glm_moe_dsa``, sparse attention):
same logits as ``transformers``, a latent KV cache, checkpoints both ways."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

transformers = pytest.importorskip("transformers")

from openglm import Config, GLMForCausalLM, load_model, save_model  # noqa: E402
from padding import padded_logits  # noqa: E402
from openglm.model.kv_cache import LatentKVCache  # noqa: E402

TOL = 1e-4

# Odd widths everywhere: 3 heads, latent 14, query latent 10, rotary 6, values 12 != nope 10.
SHAPE = dict(vocab_size=97, hidden_size=44, intermediate_size=52, moe_intermediate_size=20, num_hidden_layers=3,
             num_attention_heads=3, num_key_value_heads=3, n_routed_experts=6, num_experts_per_tok=2, n_shared_experts=1,
             routed_scaling_factor=1.8, kv_lora_rank=14, q_lora_rank=10, qk_rope_head_dim=6, qk_nope_head_dim=10,
             v_head_dim=12, max_position_embeddings=256, pad_token_id=0, eos_token_id=[1],
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
# Sparse attention keeps 5 keys per query, so every sequence below outgrows it; layer 1 reuses layer 0's choice.
DSA = dict(index_topk=5, index_n_heads=6, index_head_dim=10, first_k_dense_replace=1,
           indexer_types=["full", "shared", "full"])


def hf_model(kind: str, seed: int = 0, **overrides):
    """A tiny random Glm4MoeLiteForCausalLM ("lite") or GlmMoeDsaForCausalLM ("dsa") built by transformers itself."""
    torch.manual_seed(seed)
    if kind == "lite":
        config = transformers.Glm4MoeLiteConfig(**{**SHAPE, "mlp_layer_types": ["dense", "sparse", "sparse"], **overrides})
        model = transformers.Glm4MoeLiteForCausalLM(config)
    else:
        model = transformers.GlmMoeDsaForCausalLM(transformers.GlmMoeDsaConfig(**{**SHAPE, **DSA, **overrides}))
    with torch.no_grad():  # the default init is too small for differences (or routing, or key choice) to show
        for p in model.parameters():
            p.normal_(0, 0.3)
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.3)
    return model.eval()


def ids(B: int, T: int, seed: int) -> torch.Tensor:
    return torch.randint(2, 97, (B, T), generator=torch.Generator().manual_seed(seed))


VARIANTS = {
    "lite": ("lite", {}),
    "lite-plain-query-halves-bias": ("lite", dict(q_lora_rank=None, rope_interleave=False, attention_bias=True)),
    "dsa": ("dsa", {}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_checkpoint_loads_with_same_logits(tmp_path, variant):
    kind, overrides = VARIANTS[variant]
    hf = hf_model(kind, **overrides)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    c = ours.config
    assert c.model_type == {"lite": "glm4_moe_lite", "dsa": "glm_moe_dsa"}[kind]
    assert (c.kv_lora_rank, c.qk_rope_head_dim, c.v_head_dim, c.mlp_layer_types) == (14, 6, 12, ["dense", "sparse", "sparse"])
    if kind == "dsa":
        assert c.indexer_types == ["full", "shared", "full"] and ours.model.layers[1].self_attn.indexer is None
    x = ids(2, 23, 1)
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max().item() < TOL


@pytest.mark.parametrize("kind", ["lite", "dsa"])
def test_padded_batch_matches_transformers(tmp_path, kind):
    hf = hf_model(kind, seed=4)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    x = ids(3, 14, 5)
    a, b, real = padded_logits(hf, ours, x, [0, 5, 7])
    with torch.no_grad():
        alone = ours(x[2:3, 7:])
    assert (a[real] - b[real]).abs().max().item() < TOL
    assert (alone[0] - b[2, 7:]).abs().max().item() < TOL  # padding never changes a real row (nor its chosen keys)


@pytest.mark.parametrize("kind", ["lite", "dsa"])
def test_incremental_decode_reads_the_latent_cache_without_expanding_it(tmp_path, kind):
    hf = hf_model(kind, seed=6)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    x = ids(2, 20, 7)
    cache = ours.new_cache(2, 32)
    # Per token and layer: the latent and the rotary key (14 + 6), nothing per head.
    assert isinstance(cache, LatentKVCache) and cache.latent.shape == (3, 2, 32, 20)
    assert cache.index.shape == ((2, 2, 32, 10) if kind == "dsa" else (0, 2, 32, 0))
    expanded = []
    for layer in ours.model.layers:
        layer.self_attn.kv_b_proj.register_forward_hook(lambda m, args, out: expanded.append(args[0].shape[1]))
    with torch.no_grad():
        full = hf(x).logits
        steps = [ours(x[:, :8], cache=cache)]
        # Prefill expands the 8 new tokens' keys and values once (sparse attention, reading 5 keys per query, never does).
        prefill = [8, 8, 8] if kind == "lite" else []
        assert expanded == prefill
        steps += [ours(x[:, t:t + 1], cache=cache) for t in range(8, 16)]  # one token at a time
        steps.append(ours(x[:, 16:], cache=cache))  # and a chunk of 4 over the cache
    assert expanded == prefill, "a step over cached tokens rebuilt per-head keys and values"
    assert cache.length == 20
    assert (torch.cat(steps, 1) - full).abs().max().item() < TOL


@pytest.mark.parametrize("name", ["glm-4.7-flash-debug", "glm-5-debug"])
def test_our_checkpoint_loads_in_transformers(tmp_path, name):
    config = Config.from_name(name, eos_token_id=[1], pad_token_id=0, num_layers=3, mlp_layer_types=None,
                              indexer_types=["full", "shared", "full"] if name == "glm-5-debug" else None)
    ours = GLMForCausalLM.from_config(config, seed=3)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.3)
    save_model(ours, tmp_path / "ckpt")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert type(hf).__name__ == {"glm-4.7-flash-debug": "Glm4MoeLiteForCausalLM",
                                 "glm-5-debug": "GlmMoeDsaForCausalLM"}[name]
    x = torch.randint(0, config.vocab_size, (2, 21), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max().item() < TOL
    back = load_model(tmp_path / "ckpt")  # and the round trip is exact
    assert back.config == config
    for k, v in ours.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


def test_bfloat16_load_keeps_routers_and_indexer_weights_in_float32(tmp_path):
    hf_model("dsa", seed=8).save_pretrained(tmp_path)
    ours = load_model(tmp_path, dtype=torch.bfloat16)
    attn = ours.model.layers[2].self_attn
    assert attn.indexer.weights_proj.weight.dtype == ours.model.layers[2].mlp.gate.weight.dtype == torch.float32
    assert attn.indexer.wq_b.weight.dtype == attn.kv_b_proj.weight.dtype == torch.bfloat16
    cache = ours.new_cache(1, 16)
    assert cache.latent.dtype == torch.bfloat16
    with torch.no_grad():
        steps = [ours(ids(1, 9, 9), cache=cache)] + [ours(ids(1, 1, t), cache=cache) for t in range(3)]
    assert all(torch.isfinite(s).all() for s in steps)


def test_config_json_round_trips_through_transformers(tmp_path):
    for name, model_type in (("glm-4.7-flash", "glm4_moe_lite"), ("glm-5", "glm_moe_dsa")):
        config = Config.from_name(name)
        config.save(tmp_path)
        hf = transformers.AutoConfig.from_pretrained(tmp_path)
        assert hf.model_type == model_type and hf.kv_lora_rank == 512 and hf.qk_rope_head_dim == 64
        assert hf.mlp_layer_types == config.mlp_layer_types
        assert Config.from_file(tmp_path) == config
    assert hf.index_topk == 2048 and hf.indexer_types == ["full"] * 78
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["GlmMoeDsaForCausalLM"]


def test_published_shapes():
    flash, glm5 = Config.from_name("glm-4.7-flash"), Config.from_name("glm-5")
    assert round(flash.num_parameters / 1e9, 1) == 29.9  # "30B total"
    assert round(glm5.num_parameters / 1e9) == 744  # "744B total"
    # The latent cache: (512 + 64) x 47 layers x 2 bytes; GLM-5 adds a 128-wide indexer key per layer.
    assert flash.kv_cache_bytes_per_token == 576 * 47 * 2
    assert glm5.kv_cache_bytes_per_token == (576 + 128) * 78 * 2


def _attention_flops(model, context: int) -> tuple[int, int]:
    """FLOPs of one decode step after ``context`` tokens: (attention without its indexers, the indexers)."""
    cache = model.new_cache(1, context + 1)
    with torch.no_grad():
        model(torch.randint(0, 512, (1, context)), cache=cache)
        counter = FlopCounterMode(display=False)
        with counter:
            model(torch.randint(0, 512, (1, 1)), cache=cache)
    counts = counter.get_flop_counts()
    total = lambda part: sum(sum(counts.get(f"GLMForCausalLM.model.layers.{i}.self_attn{part}", {}).values())
                             for i in range(model.config.num_layers))
    return total("") - total(".indexer"), total(".indexer")


def test_sparse_attention_cost_per_decode_step_stops_growing_past_index_topk():
    sparse = GLMForCausalLM.from_config(Config.from_name("glm-5-debug"), seed=0).eval()  # index_topk 8
    dense = GLMForCausalLM.from_config(Config.from_name("glm-4.7-flash-debug", q_lora_rank=24), seed=0).eval()
    contexts = [4, 8, 32, 128]
    attention = {n: _attention_flops(sparse, n) for n in contexts}
    dense_attention = [_attention_flops(dense, n)[0] for n in contexts]
    assert attention[4][0] < attention[8][0]  # up to index_topk keys it grows with the context
    assert attention[8][0] == attention[32][0] == attention[128][0]  # past it, it reads 8 keys whatever the context
    assert dense_attention[0] < dense_attention[1] < dense_attention[2] < dense_attention[3]
    # Only the light indexer's scoring still grows (one 16-wide key per token and layer).
    assert attention[8][1] < attention[32][1] < attention[128][1]


def test_info_shows_the_latent_cache_next_to_gqa():
    import re
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "openglm", "info", "glm-4.7-flash"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in r.stdout.splitlines()[:11])
    assert lines["model type"] == "glm4_moe_lite"
    assert lines["attention"] == "multi-head latent: latent 512 + rotary key 64 cached per layer"
    assert lines["KV cache bf16"] == "52.9 KiB per token (a GQA model of the same depth, 8 KV heads of 128: 188.0 KiB, 3.6x)"
