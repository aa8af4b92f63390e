"""GGUF export: llama.cpp's glm4 names and metadata, the tokenizer, and weights read back with gguf's reader."""

from __future__ import annotations

import numpy as np
import pytest

from openglm import load_model
from openglm.cli import main
from openglm.data.chat import CHAT_TEMPLATES, render_chat_text, save_chat_template
from openglm.errors import OpenGLMError
from openglm.quant.gguf import export_gguf
from llama_runs import assert_llama_cpp_runs_like_openglm

gguf = pytest.importorskip("gguf")


def _field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize("out_type,atol", [("f32", 0.0), ("f16", 1e-2), ("q8_0", 0.05), ("q4_0", 0.6)])
def test_export_reads_back(tiny_checkpoint, tokenizer, tmp_path, out_type, atol):
    path = export_gguf(tiny_checkpoint, tmp_path / "m.gguf", out_type)
    reader = gguf.GGUFReader(str(path))
    model = load_model(tiny_checkpoint)
    c = model.config
    assert _field(reader, "general.architecture") == "glm4"
    assert _field(reader, "glm4.block_count") == c.num_layers
    assert _field(reader, "glm4.embedding_length") == c.hidden_size
    assert _field(reader, "glm4.feed_forward_length") == c.intermediate_size
    assert _field(reader, "glm4.attention.head_count_kv") == c.num_kv_heads
    assert _field(reader, "glm4.rope.dimension_count") == c.rotary_dim
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == tokenizer.vocab_size
    eos = tokenizer.token_id("<|endoftext|>")
    assert tokens[eos] == "<|endoftext|>" and _field(reader, "tokenizer.ggml.eos_token_id") == eos
    assert _field(reader, "tokenizer.ggml.token_type")[eos] == gguf.TokenType.CONTROL
    assert _field(reader, "tokenizer.ggml.eot_token_id") == tokenizer.token_id("<|user|>")

    tensors = {t.name: t for t in reader.tensors}
    state = model.state_dict()
    assert len(tensors) == len(state)
    for gguf_name, ours in (("token_embd.weight", "model.embed_tokens.weight"), ("output.weight", "lm_head.weight"),
                            ("blk.1.ffn_up.weight", "model.layers.1.mlp.gate_up_proj.weight"),
                            ("blk.0.attn_q.bias", "model.layers.0.self_attn.q_proj.bias"),
                            ("blk.1.post_ffw_norm.weight", "model.layers.1.post_mlp_layernorm.weight")):
        t = tensors[gguf_name]
        expected = state[ours].float().numpy()
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(expected.shape)
        assert t.tensor_type == (getattr(gguf.GGMLQuantizationType, out_type.upper()) if expected.ndim == 2
                                 else gguf.GGMLQuantizationType.F32)
        scale = np.abs(expected).max()
        assert np.abs(got - expected).max() <= atol * scale + 1e-6, gguf_name


CONVERSATION = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "你好"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is GLM?"}]


def _render_as_llama_cpp(template: str, messages: list[dict]) -> str:
    """The template rendered the way llama.cpp's Jinja front ends render ``tokenizer.chat_template``."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True)


def test_export_carries_the_glm4_chat_template(tiny_checkpoint, tmp_path):
    reader = gguf.GGUFReader(str(export_gguf(tiny_checkpoint, tmp_path / "m.gguf", "q8_0")))
    template = _field(reader, "tokenizer.chat_template")
    assert template == CHAT_TEMPLATES["glm4"]
    prompt = _render_as_llama_cpp(template, CONVERSATION)
    assert prompt == render_chat_text(CONVERSATION, add_generation_prompt=True)
    assert prompt == ("[gMASK]<sop><|system|>\nAnswer briefly.<|user|>\n你好<|assistant|>\nHello."
                      "<|user|>\nWhat is GLM?<|assistant|>")


def test_export_carries_the_checkpoint_own_template(tiny_checkpoint, tmp_path):
    import shutil

    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "own")
    own = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}<|assistant|>"
    save_chat_template(ckpt, own)
    reader = gguf.GGUFReader(str(export_gguf(ckpt, tmp_path / "m.gguf", "f16")))
    assert _field(reader, "tokenizer.chat_template") == own


def test_cli_convert_to_gguf(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "m-q8.gguf"
    assert main(["convert", str(tiny_checkpoint), "--to", "gguf", "--gguf-type", "q8_0", "-o", str(out)]) == 0
    assert "q8_0" in capsys.readouterr().out and out.is_file()


def test_quantized_sources_are_refused(tiny_checkpoint, tmp_path):
    from openglm import save_model
    from openglm.quant import quantize_model

    q = save_model(quantize_model(load_model(tiny_checkpoint), "int8"), tmp_path / "q")
    with pytest.raises(OpenGLMError, match="quantized"):
        export_gguf(q, tmp_path / "q.gguf")


def test_llama_cpp_runs_the_export_like_openglm(tiny_checkpoint, tokenizer, tmp_path):
    llm = assert_llama_cpp_runs_like_openglm(tiny_checkpoint, tokenizer, tmp_path)
    assert llm.tokenize(b"fills blanks in text", add_bos=False, special=False) == tokenizer.encode("fills blanks in text")


def test_llama_cpp_chats_in_the_glm4_format(tiny_checkpoint, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    path = export_gguf(tiny_checkpoint, tmp_path / "m.gguf", "f32")
    llm = llama_cpp.Llama(str(path), n_ctx=256, verbose=False, n_threads=1)
    assert llm.metadata["tokenizer.chat_template"] == CHAT_TEMPLATES["glm4"]
    reply = llm.create_chat_completion(messages=CONVERSATION, max_tokens=4, temperature=0)
    assert reply["choices"][0]["message"]["role"] == "assistant"
    assert reply["usage"]["prompt_tokens"] == len(llm.tokenize(
        render_chat_text(CONVERSATION, add_generation_prompt=True).encode(), add_bos=False, special=True))
