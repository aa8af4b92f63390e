"""The decode weight layout changes memory order only: same logits, same state dict, same checkpoint."""

from __future__ import annotations

import torch

from openglm import Config, GLMForCausalLM, load_model, save_model
from openglm.model.glm import use_decode_layout


def test_layout_keeps_values_names_and_checkpoints(tmp_path):
    model = GLMForCausalLM.from_config(Config.from_name("glm-tiny-debug", post_norms=True), seed=4).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    with torch.no_grad():
        want = model(ids)
        use_decode_layout(use_decode_layout(model))
        got = model(ids)
    assert (want - got).abs().max() < 1e-5
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(after[k].shape == v.shape and torch.equal(after[k], v) for k, v in before.items())
    assert dict(model.named_parameters()) == params  # same Parameter objects: optimizers keep working
    wide, narrow = model.model.layers[0].mlp.gate_up_proj.weight, model.model.layers[0].mlp.down_proj.weight
    assert wide.t().is_contiguous() and not wide.is_contiguous() and narrow.is_contiguous()
    save_model(model, tmp_path / "m")
    with torch.no_grad():
        assert (load_model(tmp_path / "m")(ids) - want).abs().max() < 1e-5
