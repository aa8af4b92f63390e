"""Checkpoint files: layout, sharding, dtypes, atomic saves and clear errors for bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from openglm import Config, GLMForCausalLM, OpenGLMError, load_model, save_model
from openglm.model import checkpoint


def tiny(**overrides):
    return GLMForCausalLM.from_config(Config.from_name("glm-tiny-debug", **overrides), seed=0)


def logits(model, n=12):
    with torch.no_grad():
        return model(torch.arange(n)[None] % model.config.vocab_size)


def test_layout_and_round_trip(tmp_path):
    model = tiny()
    out = save_model(model, tmp_path / "m", generation_config={"temperature": 0.7})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "glm4" and cfg["architectures"] == ["Glm4ForCausalLM"]
    assert json.loads((out / "generation_config.json").read_text())["temperature"] == 0.7
    back = load_model(out)
    assert torch.equal(logits(back), logits(model))
    assert not back.training


def test_sharded_save_loads_identically(tmp_path):
    model = tiny()
    out = save_model(model, tmp_path / "sharded", max_shard_bytes=64 * 1024)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and (out / checkpoint.INDEX_NAME).is_file()
    assert torch.equal(logits(load_model(out)), logits(model))


def test_dtype_kept_or_cast(tmp_path):
    out = save_model(tiny().to(torch.bfloat16), tmp_path / "bf16")
    assert load_model(out).lm_head.weight.dtype == torch.bfloat16
    assert load_model(out, dtype=torch.float32).lm_head.weight.dtype == torch.float32


def test_storage_dtype_halves_files_and_loads_back_in_fp32(tmp_path):
    model = tiny()
    full = save_model(model, tmp_path / "fp32")
    half = save_model(model, tmp_path / "bf16-stored", storage_dtype=torch.bfloat16)
    assert (half / "model.safetensors").stat().st_size < 0.6 * (full / "model.safetensors").stat().st_size
    back = load_model(half)
    assert back.lm_head.weight.dtype == torch.float32
    assert torch.equal(back.lm_head.weight, model.lm_head.weight.to(torch.bfloat16).float())


def test_no_kv_cache_or_rotary_buffers_in_state_dict():
    model = tiny()
    model.new_cache(1, 8)
    names = set(model.state_dict())
    assert not any("cache" in n or "inv_freq" in n for n in names)


def test_interrupted_save_keeps_previous_checkpoint(tmp_path):
    model = tiny()
    out = save_model(model, tmp_path / "m")
    before = logits(load_model(out))

    class Exploding:
        def save(self, directory):
            raise RuntimeError("disk full")

    other = tiny()
    with torch.no_grad():
        other.lm_head.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(other, out, tokenizer=Exploding())
    assert torch.equal(logits(load_model(out)), before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary directory left behind


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(OpenGLMError, match="no checkpoint at"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(OpenGLMError, match="no checkpoint at.*bundled"):
        load_model("no-such-bundled-model")


def test_mismatched_weights_name_the_problem(tmp_path):
    out = save_model(tiny(), tmp_path / "m")
    cfg = json.loads((out / "config.json").read_text())
    cfg["hidden_size"] = 96
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(OpenGLMError, match="do not match its config.json.*shape mismatches"):
        load_model(out)


def test_missing_tensor_is_reported(tmp_path):
    out = save_model(tiny(), tmp_path / "m")
    state = {k: v for k, v in load_model(out).state_dict().items() if k != "model.norm.weight"}
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    with pytest.raises(OpenGLMError, match="missing 1 tensors.*model.norm.weight"):
        load_model(out)


def test_pickled_weights_are_refused(tmp_path):
    Config.from_name("glm-tiny-debug").save(tmp_path)
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(OpenGLMError, match="pickled weights"):
        load_model(tmp_path)


def test_corrupt_safetensors_is_a_clear_error(tmp_path):
    out = save_model(tiny(), tmp_path / "m")
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(OpenGLMError, match="cannot read"):
        load_model(out)


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(OpenGLMError, match="model_type 'llama'"):
        load_model(tmp_path)
