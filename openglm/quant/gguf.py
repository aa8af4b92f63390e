"""Export a GLM-4 (``glm4``), GLM-4.5 MoE (``glm4_moe``), GLM-4.7-Flash (``glm4_moe_lite``) or GLM-5
(``glm_moe_dsa``) checkpoint to GGUF for llama.cpp, with the ``gguf`` package.

The latent-attention models go out as llama.cpp's ``deepseek2`` and ``glm-dsa`` (see ``_latent_tensors``).

Tensor names come from ``gguf``'s own map for llama.cpp's ``glm4`` and ``glm4moe`` architectures (the
ones ``convert_hf_to_gguf.py`` uses); GLM-4 rotates interleaved pairs, which is llama.cpp's "normal"
rope for ``glm4``, and ``glm4_moe`` the two halves, llama.cpp's "neox" rope for ``glm4moe``, so
query/key weights need no permutation. MoE experts go out stacked (``ffn_{gate,up,down}_exps``, the
fused gate/up split in two), the router (``ffn_gate_inp``) and its correction bias (``exp_probs_b``)
in f32 whatever the type. The tokenizer is written as a GPT-2 style
byte-level BPE (tokens, merges, token types, special ids by name); its pre-tokenizer split is the
one llama.cpp calls ``qwen2`` (letters, single digits, punctuation runs), which ours equals.
Weight matrices are stored as ``f32``, ``f16``, ``q8_0`` or ``q4_0`` (``gguf.quants``); norms and
biases stay ``f32`` as llama.cpp expects. The chat template (the checkpoint's own, else GLM-4's, as
``openglm chat`` uses) goes in ``tokenizer.chat_template``, so llama.cpp chats in the model's format.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import OpenGLMError

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")
# llama.cpp converts GLM-4.7-Flash as DeepSeek-V2 (``deepseek2``) and GLM-5 as its own ``glm-dsa``.
LATENT_ARCHS = {"glm4_moe_lite": "DEEPSEEK2", "glm_moe_dsa": "GLM_DSA"}
# Pre-tokenizer name llama.cpp knows for our split regex (see the module docstring).
TOKENIZER_PRE = "qwen2"


def _tokenizer_metadata(writer, directory: Path, vocab_size: int) -> None:
    """Tokenizer keys; a model with more embedding rows than tokens gets ``[PAD{i}]`` placeholders."""
    import gguf

    from ..data.chat import chat_template_of
    from ..data.tokenizer import load_tokenizer

    tok = load_tokenizer(directory)
    hf = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    model = hf["model"]
    if model.get("type") != "BPE" or hf.get("normalizer") is not None:
        raise OpenGLMError("GGUF export handles byte-level BPE tokenizers without a normalizer")
    vocab = {**model["vocab"], **{t["content"]: t["id"] for t in hf.get("added_tokens", [])}}
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise OpenGLMError("the tokenizer's ids are not contiguous; GGUF needs one token per id")
    if len(vocab) > vocab_size:
        raise OpenGLMError(f"the tokenizer has {len(vocab)} tokens, more than the model's {vocab_size}")
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {t["id"] for t in hf.get("added_tokens", []) if t.get("special")}
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))]
    padding = range(len(tokens), vocab_size)
    tokens += [f"[PAD{i}]" for i in padding]
    types += [gguf.TokenType.UNUSED] * len(padding)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(TOKENIZER_PRE)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    eos = tok.token_id("<|endoftext|>")
    writer.add_eos_token_id(eos)
    writer.add_pad_token_id(eos)
    writer.add_eot_token_id(tok.token_id("<|user|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(chat_template_of(directory))


def export_gguf(source: str | Path, output: str | Path, out_type: str = "f16") -> Path:
    """Write checkpoint ``source`` (a full-precision checkpoint with its tokenizer) to the
    GGUF file ``output``, weight matrices as ``out_type`` (one of ``GGUF_TYPES``). Returns the path."""
    import gguf
    import torch

    from ..model.checkpoint import checkpoint_dir, load_model

    if out_type not in GGUF_TYPES:
        raise OpenGLMError(f"unknown GGUF type {out_type!r} (known: {', '.join(GGUF_TYPES)})")
    directory = checkpoint_dir(source)
    model = load_model(directory, dtype=torch.float32)
    c = model.config
    if getattr(model, "quantization", None) is not None:
        raise OpenGLMError(f"{directory} is quantized ({model.quantization.label}); export the full-precision "
                           "checkpoint and choose --gguf-type q8_0 or q4_0 instead")
    mla = c.model_type in LATENT_ARCHS
    if c.model_type not in ("glm4", "glm4_moe", *LATENT_ARCHS) or c.position_encoding_2d:
        raise OpenGLMError("GGUF export handles the GLM-4-0414 (`glm4`), GLM-4.5 MoE (`glm4_moe`), GLM-4.7-Flash "
                           "(`glm4_moe_lite`) and GLM-5 (`glm_moe_dsa`) architectures only")
    if c.n_group > 1:
        raise OpenGLMError(f"GGUF export of group-limited routing (n_group={c.n_group}) is not supported: "
                           "this export routes over all experts")
    if mla:
        _check_latent(c)
    if not (directory / "tokenizer.json").is_file():
        raise OpenGLMError(f"no tokenizer.json in {directory}; GGUF files carry their tokenizer")

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    arch = gguf.MODEL_ARCH.GLM4_MOE if c.num_experts else gguf.MODEL_ARCH.GLM4
    if mla:
        arch = getattr(gguf.MODEL_ARCH, LATENT_ARCHS[c.model_type])
    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(c.name)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_heads)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    if mla:
        _latent_metadata(writer, c)
    else:
        writer.add_head_count_kv(c.num_kv_heads)
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
        writer.add_rope_dimension_count(c.rotary_dim)
    if c.num_experts and not mla:
        writer.add_expert_shared_count(c.num_shared_experts)
        writer.add_expert_feed_forward_length(c.moe_intermediate_size)
        writer.add_leading_dense_block_count(c.first_k_dense_replace)
        _add_routing(writer, c)
        writer.add_nextn_predict_layers(0)
    qtype = getattr(gguf.GGMLQuantizationType, out_type.upper())
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[out_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _tokenizer_metadata(writer, directory, c.vocab_size)

    names = gguf.get_tensor_name_map(arch, c.num_layers)
    state = _moe_names(model.state_dict()) if c.num_experts else model.state_dict()
    if mla:
        state = _latent_tensors(state, c)
    if c.tie_word_embeddings:
        state.pop("lm_head.weight")  # llama.cpp reuses token_embd when there is no output tensor
    for name, t in state.items():
        new_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise OpenGLMError(f"no GGUF name for tensor {name}")
        data = t.detach().float().numpy()
        if data.ndim == 1 or ".ffn_gate_inp." in new_name:
            writer.add_tensor(new_name, data)  # norms, biases and the router: f32
        elif out_type == "f16":
            writer.add_tensor(new_name, data.astype(np.float16))
        elif out_type == "f32":
            writer.add_tensor(new_name, data)
        elif data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            # Rows shorter than a quantization block (small MLA heads): f16, as convert_hf_to_gguf.py falls back.
            writer.add_tensor(new_name, data.astype(np.float16))
        else:
            writer.add_tensor(new_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    try:
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise  # a crash never leaves a half-written file under the final name
    return output


def _moe_names(state: dict) -> dict:
    """A ``glm4_moe`` state dict under the names ``gguf``'s map knows (those ``convert_hf_to_gguf.py``
    gives merged experts): fused gate/up projections (dense, shared and stacked experts) split in two,
    ``.weight`` on the stacked experts, the correction bias as ``e_score_correction.bias``."""
    out = {}
    for name, t in state.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # stacked: HF names without ".weight"
            name += ".weight"
        if name.endswith("gate_up_proj.weight"):
            gate, up = t.chunk(2, dim=-2)
            out[name.replace("gate_up_proj", "gate_proj")] = gate
            out[name.replace("gate_up_proj", "up_proj")] = up
        elif name.endswith("e_score_correction_bias"):
            out[name.replace("e_score_correction_bias", "e_score_correction.bias")] = t
        else:
            out[name] = t
    return out


def _add_routing(writer, c) -> None:
    """The router's keys, as llama.cpp's glm4moe and deepseek2 read them: sigmoid scores, top-k, scale, norm."""
    import gguf

    writer.add_expert_count(c.num_experts)
    writer.add_expert_used_count(c.num_experts_per_tok)
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    writer.add_expert_weights_scale(c.routed_scaling_factor)
    writer.add_expert_weights_norm(c.norm_topk_prob)


def _check_latent(c) -> None:
    """Refuse what llama.cpp's ``deepseek2`` / ``glm-dsa`` graphs cannot represent, one line each."""
    if c.attention_bias:
        raise OpenGLMError("GGUF export of latent attention with attention_bias is not supported: "
                           "llama.cpp's deepseek2/glm-dsa attention has no projection biases")
    kinds = c.mlp_layer_types
    dense = kinds.index("sparse") if "sparse" in kinds else len(kinds)
    if "dense" in kinds[dense:]:
        raise OpenGLMError(f"GGUF export needs the dense MLP layers first (mlp_layer_types={kinds}): "
                           "llama.cpp only knows a count of leading dense layers")
    if c.index_topk and "shared" in c.indexer_types:
        raise OpenGLMError(f"GGUF export of indexer_types with 'shared' layers ({c.indexer_types}) is not supported: "
                           "this gguf version has no key for it, llama.cpp's glm-dsa runs an indexer in every layer")
    if c.index_topk and c.index_head_dim % 64:
        raise OpenGLMError(f"GGUF export of sparse attention needs index_head_dim a multiple of 64, got "
                           f"{c.index_head_dim}: llama.cpp's glm-dsa turns the indexer's queries and keys by a "
                           "Hadamard matrix of 64 or more dims (GLM-5 has 128)")
    if c.index_topk and c.max_position_embeddings >= 1 << 20:
        # Without that key llama.cpp takes a context of 1M tokens or more for GLM-5.2's full/shared schedule.
        raise OpenGLMError(f"GGUF export of sparse attention with a context of {c.max_position_embeddings} tokens "
                           "(>= 1048576) is not supported: llama.cpp would assume GLM-5.2's shared indexer layers")


def _latent_metadata(writer, c) -> None:
    """The keys ``convert_hf_to_gguf.py`` writes for ``deepseek2`` and ``glm-dsa``: attention runs as MQA
    over the latent (one key/value "head" of ``kv_lora_rank + qk_rope_head_dim`` / ``kv_lora_rank``), with
    the per-head sizes in the ``_mla`` keys."""
    import gguf

    r, dr = c.kv_lora_rank, c.qk_rope_head_dim
    writer.add_vocab_size(c.vocab_size)
    writer.add_head_count_kv(1)
    if c.q_lora_rank:
        writer.add_q_lora_rank(c.q_lora_rank)
    writer.add_kv_lora_rank(r)
    writer.add_key_length(r + dr)
    writer.add_value_length(r)
    writer.add_key_length_mla(c.qk_nope_head_dim + dr)
    writer.add_value_length_mla(c.v_head_dim)
    writer.add_rope_dimension_count(dr)
    kinds = c.mlp_layer_types
    writer.add_leading_dense_block_count(kinds.index("sparse") if "sparse" in kinds else len(kinds))
    writer.add_expert_feed_forward_length(c.moe_intermediate_size if c.num_experts else c.intermediate_size)
    writer.add_expert_shared_count(c.num_shared_experts if c.num_experts else 0)
    if c.num_experts:
        _add_routing(writer, c)
    writer.add_nextn_predict_layers(0)
    if c.index_topk:
        writer.add_indexer_head_count(c.index_n_heads)
        writer.add_indexer_key_length(c.index_head_dim)
        writer.add_indexer_top_k(c.index_topk)


def _pair_rope_rows(t, start: int, dim: int, period: int):
    """Regroup the rotary output rows ``[start, start + dim)`` of every ``period`` rows of ``t`` from
    halves ``(x[i], x[i + dim/2])`` into interleaved pairs ``(x[2i], x[2i+1])``."""
    import torch

    rows = t.unflatten(0, (-1, period)).clone()
    rot = rows[:, start:start + dim]
    rows[:, start:start + dim] = torch.stack((rot[:, : dim // 2], rot[:, dim // 2:]), dim=2).flatten(1, 2)
    return rows.flatten(0, 1)


def _latent_tensors(state: dict, c) -> dict:
    """Latent-attention tensors laid out as llama.cpp reads them (``convert_hf_to_gguf.py``'s DeepSeek-V2 path).

    ``kv_b_proj`` is split per head into ``k_b`` (transposed: ``[H, kv_lora_rank, qk_nope_head_dim]``) and
    ``v_b`` (``[H, v_head_dim, kv_lora_rank]``), the form llama.cpp's absorbed attention multiplies by.
    llama.cpp rotates MLA's rotary part as interleaved pairs (its "normal" rope, also for the ``glm-dsa``
    indexer, as ours), so only a checkpoint that rotates halves (``rope_interleave=False``) changes: the
    rotary rows of its query and ``kv_a_proj_with_mqa`` are regrouped into pairs; the rotation is the
    same and q.k is unchanged.
    """
    H, dn, dr, dv, r = c.num_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
    out = {}
    for name, t in state.items():
        if name.endswith("kv_b_proj.weight"):
            k_b, v_b = t.unflatten(0, (H, dn + dv)).split([dn, dv], dim=1)
            out[name.replace("kv_b_proj", "k_b_proj")] = k_b.transpose(1, 2).contiguous()
            out[name.replace("kv_b_proj", "v_b_proj")] = v_b.contiguous()
            continue
        if not c.rotary_interleaved and name.endswith(("q_b_proj.weight", "self_attn.q_proj.weight")):
            t = _pair_rope_rows(t, dn, dr, dn + dr)
        elif not c.rotary_interleaved and name.endswith("kv_a_proj_with_mqa.weight"):
            t = _pair_rope_rows(t, r, dr, r + dr)
        out[name] = t
    return out
