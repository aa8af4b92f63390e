"""``openglm info`` and ``openglm convert``."""

from __future__ import annotations

import dataclasses
import json


def _describe(source: str):
    """(config, checkpoint directory or None) for a checkpoint path, a bundled name or a config name."""
    from ..config import CONFIGS, Config
    from ..errors import OpenGLMError
    from .checkpoint import checkpoint_dir

    try:
        directory = checkpoint_dir(source)
        if not (directory / "config.json").is_file() and source in CONFIGS:
            raise OpenGLMError("a bundled directory without weights yet")
    except OpenGLMError:
        if source in CONFIGS:
            return Config.from_name(source), None
        raise OpenGLMError(f"{source!r} is neither a checkpoint (path or bundled name) nor a config name "
                           f"(known configs: {', '.join(sorted(CONFIGS))})") from None
    return Config.from_file(directory), directory


def cmd_info(args) -> int:
    from .checkpoint import weight_files

    config, directory = _describe(args.model)
    n = config.num_parameters
    embed = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
    rows = [("name", config.name), ("model type", config.model_type + (" (2D positions)" if config.position_encoding_2d else "")),
            ("parameters", f"{n:,} ({n / 1e6:.1f}M; {n - embed:,} outside embeddings)")]
    active = config.num_active_parameters
    if config.num_experts:
        rows.append(("experts", f"{config.num_experts} routed ({config.num_experts_per_tok} per token) + "
                                f"{config.num_shared_experts} shared, in {config.num_moe_layers} of {config.num_layers} layers"))
        rows.append(("active parameters", f"{active:,} per token ({active / 1e9:.2f}B; {active - embed:,} outside embeddings)"))
    # A decode step reads the active weights but only one row of the input embeddings.
    per_token = active - (0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size)
    for dtype, nbytes in (("fp32", 4), ("bf16", 2), ("int8", 1), ("int4", 0.5)):
        read = f" ({per_token * nbytes / 2**20:,.1f} MiB read per decoded token)" if config.num_experts else ""
        rows.append((f"weights {dtype}", f"{n * nbytes / 2**20:,.1f} MiB{read}"))
    kv = config.kv_cache_bytes_per_token
    if config.kv_lora_rank:
        rows.append(("attention", f"multi-head latent: latent {config.kv_lora_rank} + rotary key {config.qk_rope_head_dim} "
                                  f"cached per layer" + (f"; sparse, {config.index_topk} keys per query chosen by "
                                                         f"{config.index_n_heads}-head indexers" if config.index_topk else "")))
        # The comparison: the same depth with GLM-4.5's grouped-query attention (8 KV heads of 128).
        gqa = 2 * config.num_layers * 8 * 128 * 2
        rows.append(("KV cache bf16", f"{kv / 1024:,.1f} KiB per token (a GQA model of the same depth, 8 KV heads of "
                                      f"128: {gqa / 1024:,.1f} KiB, {gqa / kv:.1f}x)"))
    else:
        rows.append(("KV cache bf16", f"{kv / 1024:,.1f} KiB per token"))
    if directory is not None:
        files = weight_files(directory)
        rows.append(("checkpoint", f"{directory} ({sum(f.stat().st_size for f in files) / 2**20:,.1f} MiB in {len(files)} file(s))"))
        rows.append(("tokenizer", "yes" if (directory / "tokenizer.json").is_file() else "none"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print("config:")
    print(json.dumps(dataclasses.asdict(config), indent=2))
    return 0


def cmd_convert(args) -> int:
    from ..errors import OpenGLMError
    from ..utils import check_writable

    check_writable(args.output, directory=args.to != "gguf")
    if args.to == "hf":
        from .convert import convert_chatglm

        out = convert_chatglm(args.source, args.output)
        print(f"wrote {out}")
        return 0
    if args.to == "gguf":
        from ..quant.gguf import export_gguf

        out = export_gguf(args.source, args.output, args.gguf_type)
        print(f"wrote {out} ({args.gguf_type}, {out.stat().st_size / 2**20:,.1f} MiB)")
        return 0
    raise OpenGLMError(f"unknown target format {args.to!r}")


def register(sub) -> None:
    p = sub.add_parser("info", help="parameters, memory and config of a checkpoint or config name",
                       description="Show parameters, memory and config of MODEL: a checkpoint directory, a bundled name or a config name.")
    p.add_argument("model")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="convert a checkpoint to another layout",
                       description="Convert SOURCE (a ChatGLM2/3 safetensors checkpoint) into the Hugging Face glm layout "
                                   "openglm uses (--to hf), or an openglm GLM-4 (glm4) or GLM-4.5 MoE (glm4_moe) checkpoint into one GGUF file "
                                   "for llama.cpp (--to gguf).")
    p.add_argument("source", help="checkpoint directory (or bundled name, for --to gguf)")
    p.add_argument("-o", "--output", required=True, help="output directory (hf) or file (gguf)")
    p.add_argument("--to", default="hf", choices=["hf", "gguf"], help="target layout")
    p.add_argument("--gguf-type", default="f16", choices=["f32", "f16", "q8_0", "q4_0"],
                   help="GGUF: type of the weight matrices (default f16; norms and biases stay f32)")
    p.set_defaults(func=cmd_convert)
