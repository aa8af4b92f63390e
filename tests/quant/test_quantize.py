"""Whole-model quantization: checkpoints that record their scheme, load like any other and give identical logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from openglm import load_model, save_model
from openglm.cli import main
from openglm.errors import OpenGLMError
from openglm.quant import QUANT_METADATA_KEY, QuantEmbedding, QuantLinear, QuantScheme, quantize_model

SCHEMES = [("int8", None, True), ("int4", 32, True), ("int4", 32, False), ("int4", 64, True)]


@pytest.fixture
def ids(tokenizer):
    return torch.tensor([tokenizer.encode("The General Language Model fills blanks in text.")[:12]] * 2)


@pytest.mark.parametrize("scheme,group,symmetric", SCHEMES)
def test_save_load_round_trip_gives_identical_logits(tiny_checkpoint, tmp_path, ids, scheme, group, symmetric):
    model = quantize_model(load_model(tiny_checkpoint), scheme, group, symmetric)
    with torch.no_grad():
        before = model(ids)
        full = load_model(tiny_checkpoint)(ids)
    # random weights scaled x10 amplify errors; the real quality check is `openglm eval --compare`
    assert 0 < (before - full).norm() / full.norm() < (0.05 if scheme == "int8" else 0.5)
    out = save_model(model, tmp_path / "renamed-without-scheme-hint")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        recorded = json.loads(f.metadata()[QUANT_METADATA_KEY])
    assert recorded["scheme"] == scheme and recorded["group_size"] == group and recorded["symmetric"] == symmetric
    loaded = load_model(out)
    assert isinstance(loaded.lm_head, QuantLinear) and loaded.quantization == model.quantization
    with torch.no_grad():
        assert torch.equal(loaded(ids), before)
    # generation uses a cache of the model's float dtype
    cache = loaded.new_cache(2, 16)
    assert cache.k.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(loaded(ids, cache=cache), before)


def test_options_choose_the_modules(tiny_checkpoint, tmp_path, ids):
    model = quantize_model(load_model(tiny_checkpoint), "int4", 32, include_embeddings=True, include_lm_head=False)
    assert isinstance(model.model.embed_tokens, QuantEmbedding)
    assert type(model.lm_head) is torch.nn.Linear
    assert isinstance(model.model.layers[0].mlp.gate_up_proj, QuantLinear)
    assert "lm_head" not in model.quantization.modules
    with torch.no_grad():
        before = model(ids)
        loaded = load_model(save_model(model, tmp_path / "q"))
        assert torch.equal(loaded(ids), before)


def test_quantized_checkpoint_is_smaller(tiny_checkpoint, tmp_path):
    sizes = {}
    for scheme in ("int8", "int4"):
        out = save_model(quantize_model(load_model(tiny_checkpoint), scheme, 32), tmp_path / scheme)
        sizes[scheme] = (out / "model.safetensors").stat().st_size
    full = (tiny_checkpoint / "model.safetensors").stat().st_size
    assert sizes["int4"] < sizes["int8"] < full / 2


def test_errors(tiny_checkpoint):
    model = load_model(tiny_checkpoint)
    with pytest.raises(OpenGLMError, match="group size"):
        quantize_model(model, "int4", 48)
    with pytest.raises(OpenGLMError, match="unknown quantization scheme"):
        quantize_model(model, "int2")
    quantize_model(model, "int8")
    with pytest.raises(OpenGLMError, match="already quantized"):
        quantize_model(model, "int8")
    with pytest.raises(OpenGLMError, match="unreadable quantization metadata"):
        QuantScheme.from_metadata({QUANT_METADATA_KEY: "{not json"})


def test_cli_quantize(tiny_checkpoint, tmp_path, capsys, ids):
    out = tmp_path / "q4"
    assert main(["quantize", str(tiny_checkpoint), "--scheme", "int4", "--group-size", "32", "--asymmetric",
                 "-o", str(out)]) == 0
    assert "int4-g32-asym" in capsys.readouterr().out
    model = load_model(out)
    assert model.quantization.label == "int4-g32-asym" and (out / "tokenizer.json").is_file()
    assert main(["quantize", str(out), "--scheme", "int8", "-o", str(tmp_path / "again")]) == 1
    assert "already quantized" in capsys.readouterr().err


@pytest.mark.slow
def test_quantized_model_under_torch_compile(tiny_checkpoint, ids):
    model = quantize_model(load_model(tiny_checkpoint), "int4", 32)
    with torch.no_grad():
        eager = model(ids)
        compiled = torch.compile(model)(ids)
    assert torch.allclose(compiled, eager, atol=1e-2, rtol=1e-2)


def test_decode_layout_fuses_quantized_qkv_without_changing_outputs(tiny_checkpoint, ids, tmp_path):
    from openglm.model.glm import Attention, use_decode_layout

    model = quantize_model(load_model(tiny_checkpoint), "int4", 32)
    with torch.no_grad():
        before = model(ids)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        use_decode_layout(model)
        attentions = [m for m in model.modules() if isinstance(m, Attention)]
        assert attentions and all(a.qkv is not None for a in attentions)

        def steps():  # one token at a time: the fused call
            cache = model.new_cache(ids.shape[0], ids.shape[1])
            return torch.cat([model(ids[:, t:t + 1], cache=cache) for t in range(ids.shape[1])], dim=1)

        fused, kept = steps(), [a.qkv for a in attentions]
        for a in attentions:
            a.qkv = None
        assert torch.equal(fused, steps())  # the same arithmetic per row as three calls
        for a, qkv in zip(attentions, kept):
            a.qkv = qkv
    assert torch.allclose(fused, before, atol=1e-3, rtol=1e-3)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    save_model(model, tmp_path / "again")  # the checkpoint is as before
    assert torch.equal(load_model(tmp_path / "again")(ids), before)
