"""``openglm quantize``: write a weight-only quantized copy of a checkpoint."""

from __future__ import annotations


def cmd_quantize(args) -> int:
    import json
    import shutil

    import torch
    from safetensors import safe_open

    from ..data.tokenizer import load_tokenizer
    from ..errors import OpenGLMError
    from ..model.checkpoint import checkpoint_dir, load_model, save_model, weight_files
    from ..utils import check_writable
    from .quantize import quantize_model

    check_writable(args.output)
    source = checkpoint_dir(args.model)
    model = load_model(source, dtype=torch.float32)
    if getattr(model, "quantization", None) is not None:
        raise OpenGLMError(f"{source} is already quantized ({model.quantization.label})")
    quantize_model(model, args.scheme, args.group_size, symmetric=not args.asymmetric,
                   include_embeddings=args.embeddings, include_lm_head=not args.no_lm_head)
    tokenizer = load_tokenizer(source) if (source / "tokenizer.json").is_file() else None
    gen_file = source / "generation_config.json"
    generation = json.loads(gen_file.read_text(encoding="utf-8")) if gen_file.is_file() else None
    # Full-precision tensors (norms, biases, kept embeddings) keep the precision they were stored in.
    with safe_open(str(weight_files(source)[0]), framework="pt") as f:
        stored = {f.get_slice(name).get_dtype() for name in f.keys()}
    storage = torch.bfloat16 if stored == {"BF16"} else None
    out = save_model(model, args.output, tokenizer=tokenizer, generation_config=generation, storage_dtype=storage)
    if (source / "tokenizer_config.json").is_file():  # the chat template travels with the weights
        shutil.copyfile(source / "tokenizer_config.json", out / "tokenizer_config.json")
    before = sum(f.stat().st_size for f in weight_files(source))
    after = sum(f.stat().st_size for f in weight_files(out))
    scheme = model.quantization
    print(f"wrote {out}: {scheme.label}, {len(scheme.modules)} modules quantized, "
          f"weights {before / 2**20:,.1f} MiB -> {after / 2**20:,.1f} MiB")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "quantize", help="weight-only INT8/INT4 quantization of a checkpoint",
        description="Quantize MODEL's linear layers (and optionally its output layer and embeddings) to INT8 per "
                    "output channel or INT4 per group of inputs, and save a checkpoint that `openglm` loads like any "
                    "other; the scheme is recorded in the safetensors metadata. Runs on the CPU.")
    p.add_argument("model", help="checkpoint directory or bundled name")
    p.add_argument("--scheme", required=True, choices=["int8", "int4"],
                   help="int8: one scale per output channel; int4: one scale per group of inputs, two values per byte")
    p.add_argument("--group-size", type=int, choices=[32, 64, 128], default=32,
                   help="INT4: inputs per scale (default 32); ignored for INT8")
    p.add_argument("--asymmetric", action="store_true", help="INT4: a zero point per group (default symmetric)")
    p.add_argument("--embeddings", action="store_true", help="also quantize the token embeddings (default: keep them)")
    p.add_argument("--no-lm-head", action="store_true", help="keep the output layer in full precision")
    p.add_argument("-o", "--output", required=True, help="output checkpoint directory")
    p.set_defaults(func=cmd_quantize)

