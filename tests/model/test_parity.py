"""Same logits as ``transformers`` on the same weights, in both directions (glm and glm4)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from openglm import Config, GLMForCausalLM, OpenGLMError, load_model, save_model  # noqa: E402
from padding import padded_logits  # noqa: E402

TOL = 1e-4


def hf_model(post_norms: bool, seed: int = 0, **overrides):
    """A tiny random GlmForCausalLM / Glm4ForCausalLM built by transformers itself."""
    kwargs = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256, pad_token_id=0, eos_token_id=[1],
                  rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    kwargs.update(overrides)
    cfg = (transformers.Glm4Config if post_norms else transformers.GlmConfig)(**kwargs)
    torch.manual_seed(seed)
    model = (transformers.Glm4ForCausalLM if post_norms else transformers.GlmForCausalLM)(cfg)
    with torch.no_grad():  # the default init is too small for differences to show
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


@pytest.mark.parametrize("post_norms", [False, True], ids=["glm", "glm4"])
def test_hf_checkpoint_loads_with_same_logits(tmp_path, post_norms):
    hf = hf_model(post_norms)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert ours.config.model_type == ("glm4" if post_norms else "glm")
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids)).abs().max().item()
    assert diff < TOL


@pytest.mark.parametrize("post_norms", [False, True], ids=["glm", "glm4"])
def test_our_checkpoint_loads_in_transformers(tmp_path, post_norms):
    config = Config.from_name("glm-tiny-debug", post_norms=post_norms, rope_theta=500.0, eos_token_id=[1])
    ours = GLMForCausalLM.from_config(config, seed=3)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.3)
    save_model(ours, tmp_path / "ckpt")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert type(hf).__name__ == ("Glm4ForCausalLM" if post_norms else "GlmForCausalLM")
    ids = torch.randint(0, config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() < TOL


@pytest.mark.parametrize("post_norms", [False, True], ids=["glm", "glm4"])
def test_padded_batch_matches_transformers(tmp_path, post_norms):
    hf = hf_model(post_norms, seed=4)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    ids = torch.randint(2, 320, (3, 12), generator=torch.Generator().manual_seed(5))
    a, b, real = padded_logits(hf, ours, ids, [0, 5, 9])
    assert (a[real] - b[real]).abs().max().item() < TOL
    # Each padded row equals the same prompt run alone without padding.
    with torch.no_grad():
        alone = ours(ids[2:3, 9:])
    assert (alone[0] - b[2, 9:]).abs().max().item() < TOL


@pytest.mark.parametrize("post_norms", [False, True], ids=["glm", "glm4"])
def test_kv_cache_decode_matches_full_forward(tmp_path, post_norms):
    hf = hf_model(post_norms, seed=6)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    ids = torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = hf(ids).logits
        cache = ours.new_cache(2, 32)
        steps = [ours(ids[:, :8], cache=cache)]  # prefill, then one token at a time
        steps += [ours(ids[:, t:t + 1], cache=cache) for t in range(8, 20)]
    assert cache.length == 20
    assert (torch.cat(steps, 1) - full).abs().max().item() < TOL


def test_tied_embeddings_round_trip(tmp_path):
    config = Config.from_name("glm-tiny-debug", tie_word_embeddings=True)
    ours = GLMForCausalLM.from_config(config, seed=0)
    save_model(ours, tmp_path / "tied")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tied").eval()
    back = load_model(tmp_path / "tied")
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()
    ids = torch.arange(10)[None]
    with torch.no_grad():
        assert (hf(ids).logits - back(ids)).abs().max().item() < TOL


def test_other_activation_is_refused_not_loaded_wrong(tmp_path):
    hf = hf_model(post_norms=True, hidden_act="gelu")
    hf.save_pretrained(tmp_path)
    with pytest.raises(OpenGLMError, match="hidden_act 'gelu' is not supported"):
        load_model(tmp_path)


def test_checkpoint_without_end_token_generates_in_transformers(tmp_path):
    ours = GLMForCausalLM.from_config(Config.from_name("glm-tiny-debug"), seed=3)
    assert ours.config.eos_token_id == []
    save_model(ours, tmp_path / "ckpt")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    ids = torch.tensor([[5, 6, 7]])
    out = hf.generate(ids, max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        first = ours(ids)[0, -1].argmax().item()
    assert out.shape == (1, 7) and out[0, 3].item() == first
    assert load_model(tmp_path / "ckpt").config.eos_token_id == []
