from __future__ import annotations

import pytest

from openglm import Config, GLMForCausalLM, OpenGLMError
from openglm.config import CONFIGS


def test_published_glm4_9b_shape():
    c = Config.from_name("glm-4-9b")
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (4096, 40, 32, 2, 128)
    assert c.vocab_size == 151552 and c.rotary_dim == 64 and c.model_type == "glm"
    assert 9.3e9 < c.num_parameters < 9.5e9
    assert Config.from_name("glm-4-9b-0414").model_type == "glm4"


@pytest.mark.parametrize("name", [n for n in CONFIGS if not n.endswith("-debug")])
def test_each_family_has_a_debug_sibling(name):
    debug = Config.from_name(f"{name}-debug")
    assert debug.num_layers == 2 and debug.hidden_size == 64
    assert debug.post_norms == CONFIGS[name].post_norms
    assert debug.position_encoding_2d == CONFIGS[name].position_encoding_2d


def test_parameter_count_matches_the_module():
    for name in ("glm-tiny", "glm-tiny-2d-debug", "glm-4-9b-debug"):
        c = Config.from_name(name)
        model = GLMForCausalLM.from_config(c, device="meta")
        assert sum(p.numel() for p in model.parameters()) == c.num_parameters


def test_glm_tiny_is_in_the_promised_range():
    assert 10e6 <= Config.from_name("glm-tiny").num_parameters <= 30e6


def test_unknown_name_lists_known_ones():
    with pytest.raises(OpenGLMError, match="unknown config name 'glm-6'.*glm-tiny"):
        Config.from_name("glm-6")


def test_hf_dict_round_trip():
    for name in ("glm-4-9b-chat", "glm-tiny", "glm-tiny-2d"):
        c = Config.from_name(name)
        assert Config.from_hf_dict(c.to_hf_dict()) == c


def test_invalid_shapes_are_refused():
    with pytest.raises(OpenGLMError, match="multiple of"):
        Config.from_name("glm-tiny-debug", num_heads=3)
    with pytest.raises(OpenGLMError, match="2D positions"):
        Config.from_name("glm-tiny-debug", position_encoding_2d=True, partial_rotary_factor=1.0)


def test_glm_tiny_moe_uses_as_many_parameters_per_token_as_glm_tiny():
    dense, moe = CONFIGS["glm-tiny"], CONFIGS["glm-tiny-moe"]
    assert (moe.vocab_size, moe.hidden_size, moe.num_layers, moe.num_heads) == \
        (dense.vocab_size, dense.hidden_size, dense.num_layers, dense.num_heads)
    assert moe.model_type == "glm4_moe" and moe.num_moe_layers == 5
    # the routers (16 x 256 per MoE layer) less glm4's post-norms: 0.13% more per token
    assert moe.num_active_parameters == pytest.approx(dense.num_active_parameters, rel=2e-3)
    assert moe.num_parameters > 2 * dense.num_parameters
