"""``openglm quantize`` on latent-attention models (GLM-4.7-Flash, GLM-5): the quantized checkpoint loads and
decodes over the latent cache, close to the full-precision model."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from openglm import Config, GLMForCausalLM, load_model, save_model


@pytest.mark.parametrize("name", ["glm-4.7-flash-debug", "glm-5-debug"])
def test_quantized_latent_attention_model_decodes_like_the_original(tmp_path, name):
    # Widths INT4 takes (groups of 32 inputs, outputs in 16s): the debug shape's query latent is 24, its latent + rotary key 40.
    # 16 indexer heads: a key they all score negative (an exact tie at 0, kept or not as topk chooses) is rare.
    config = Config.from_name(name, q_lora_rank=32, kv_lora_rank=40, **({"index_n_heads": 16} if "5" in name else {}))
    model = GLMForCausalLM.from_config(config, seed=0).eval()
    save_model(model, tmp_path / "src")
    r = subprocess.run([sys.executable, "-m", "openglm", "quantize", str(tmp_path / "src"), "--scheme", "int4",
                        "-o", str(tmp_path / "q")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    q = load_model(tmp_path / "q")
    modules = q.quantization.modules
    assert "model.layers.0.self_attn.q_b_proj" in modules and "model.layers.0.self_attn.kv_a_proj_with_mqa" in modules
    # Read directly by the absorbed decode step, and the indexer's ranking: kept in full precision.
    assert not any(m.endswith("kv_b_proj") or ".indexer." in m for m in modules)
    ids = torch.randint(0, config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        cache = q.new_cache(2, 20)
        steps = torch.cat([q(ids[:, :12], cache=cache)] + [q(ids[:, t:t + 1], cache=cache) for t in range(12, 20)], 1)
        assert (steps - q(ids)).abs().max().item() < 1e-4  # the latent-cache decode of the quantized model is exact
    assert ((steps - full).norm() / full.norm()).item() < 0.3  # INT4 groups of 32 on a small random model
