"""Speed of openglm's mixture-of-experts layer versus a dense MLP of the same active parameters, and of
a whole MoE model's batch-1 decode against llama.cpp's ``llama-bench`` on the same GGUF at each bit width.

    python bench/moe.py [--hidden 2048] [--moe-intermediate 768] [--experts 32] [--top-k 8] [--shared 1]
                        [--tokens 1,8,128] [--repeats 7] [--dtype float32] [--threads N] [--model moe-100m]
                        [--checkpoint DIR] [--new-tokens 32] [--llama-cpp DIR | --build-llama-cpp] [--skip-layer]

Layer: the MoE block (router, ``--experts`` routed experts of width ``--moe-intermediate``, ``--top-k``
per token, ``--shared`` shared experts) against one dense SwiGLU MLP of width ``(top-k + shared) x
moe-intermediate``, i.e. the same weights per token (the router's few extra are listed). Also
``transformers``' ``Glm4MoeMoE`` on the same weights, when transformers is installed. Each row is
the median over ``--repeats`` runs, every configuration measured in turn so a busy machine slows all
alike. One token is a decode step at batch 1: it reads only the chosen experts, so its speed is also
given as weights read per second, next to the memory read bandwidth measured with the same threads
(bench/bandwidth.py).

Whole model: greedy batch-1 decode of ``--checkpoint`` (default: random weights of ``--model``; the
default ``moe-100m`` is GLM-4.5-Air's layout at ~100M parameters: hidden 768, 8 layers, the first
dense, 16 experts of width 256, top-4 plus one shared) with openglm at fp32, INT8 and INT4 (group
32, symmetric), each against ``llama-bench -p 0 -n N`` on the same weights exported as a ``glm4moe``
GGUF (``openglm convert --to gguf``) at f32, q8_0 and q4_0, with the same threads; the six are
measured in turn, ``--repeats`` rounds, medians reported. llama.cpp's tools are found or built as
bench/llama_cpp_tools.py does; without them the comparison is reported as not run.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from openglm import Config, GLMForCausalLM, SamplingParams, load_model, save_model  # noqa: E402
from openglm.data.tokenizer import load_tokenizer  # noqa: E402
from openglm.infer.generate import generate_steps  # noqa: E402
from openglm.model.glm import MLP, MoE  # noqa: E402
from openglm.quant import quantize_model  # noqa: E402
from openglm.quant.gguf import export_gguf  # noqa: E402

import llama_cpp_tools  # noqa: E402
from bandwidth import measure_bandwidth  # noqa: E402
from decode import word_tokenizer  # noqa: E402

GGUF_TYPES = {"fp32": "f32", "int8": "q8_0", "int4": "q4_0"}  # our scheme -> the GGUF type of the same bits


def layer_config(args) -> Config:
    return Config(name="bench-moe", vocab_size=256, hidden_size=args.hidden, intermediate_size=args.hidden,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=args.hidden // 4, attention_bias=False,
                  num_experts=args.experts, num_experts_per_tok=args.top_k, moe_intermediate_size=args.moe_intermediate,
                  num_shared_experts=args.shared, first_k_dense_replace=0, routed_scaling_factor=2.5)


def build_layers(args, dtype):
    """The MoE block, the dense MLP of the same active width, and transformers' block on the MoE's weights."""
    config = layer_config(args)
    torch.manual_seed(0)
    moe = MoE(config)
    dense = MLP(config, (args.top_k + args.shared) * args.moe_intermediate)
    with torch.no_grad():
        for module in (moe, dense):
            for p in module.parameters():
                p.normal_(0, config.hidden_size ** -0.5)
        moe.gate.e_score_correction_bias.normal_(0, 0.05)
    layers = {"openglm MoE": moe.to(dtype).eval(), "dense MLP, same active width": dense.to(dtype).eval()}
    try:
        import transformers
    except ImportError:
        return layers
    hf_config = transformers.Glm4MoeConfig(
        hidden_size=config.hidden_size, moe_intermediate_size=config.moe_intermediate_size,
        n_routed_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
        n_shared_experts=config.num_shared_experts, routed_scaling_factor=config.routed_scaling_factor)
    hf = transformers.models.glm4_moe.modeling_glm4_moe.Glm4MoeMoE(hf_config)
    I = config.moe_intermediate_size
    with torch.no_grad():
        hf.gate.weight.copy_(moe.gate.weight.float())
        hf.gate.e_score_correction_bias.copy_(moe.gate.e_score_correction_bias)
        hf.experts.gate_up_proj.copy_(moe.experts.gate_up_proj)
        hf.experts.down_proj.copy_(moe.experts.down_proj)
        gate, up = moe.shared_experts.gate_up_proj.weight.split(I * config.num_shared_experts)
        hf.shared_experts.gate_proj.weight.copy_(gate)
        hf.shared_experts.up_proj.weight.copy_(up)
        hf.shared_experts.down_proj.weight.copy_(moe.shared_experts.down_proj.weight)
    layers["transformers Glm4MoeMoE"] = hf.to(dtype).eval()
    return layers


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_layers(args) -> None:
    dtype = getattr(torch, args.dtype)
    layers = build_layers(args, dtype)
    moe = layers["openglm MoE"]
    C, I, k, S = args.hidden, args.moe_intermediate, args.top_k, args.shared
    elt = torch.finfo(dtype).bits // 8
    active = 3 * C * I * (k + S)
    print(f"layer: hidden {C}, {args.experts} experts of width {I}, top-{k} + {S} shared, {args.dtype}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"weights per token: {active * elt / 2**20:.1f} MiB in both (the MoE's router adds {args.experts * C * 4 / 2**20:.2f} MiB "
          f"float32); all experts {args.experts * 3 * C * I * elt / 2**20:.0f} MiB")
    token_counts = [int(t) for t in args.tokens.split(",")]
    inputs = {n: torch.randn(1, n, C, dtype=dtype) for n in token_counts}
    with torch.no_grad():  # same outputs from openglm and transformers (a wrong fast path would show here)
        x = inputs[token_counts[-1]]
        if "transformers Glm4MoeMoE" in layers:
            diff = (layers["transformers Glm4MoeMoE"](x).float() - moe(x).float()).abs().max().item()
            print(f"max |openglm - transformers| on {x.shape[1]} tokens: {diff:.2e}")
    times = {(name, n): [] for name in layers for n in token_counts}
    with torch.inference_mode():
        for name, layer in layers.items():
            for n in token_counts:
                layer(inputs[n])  # warm-up
        for _ in range(args.repeats):
            for (name, n) in times:
                times[(name, n)].append(median_time(lambda: layers[name](inputs[n]), 1))
    bandwidth = measure_bandwidth()
    print(f"memory read bandwidth {bandwidth / 1e9:.1f} GB/s")
    print("| layer | " + " | ".join(f"{n} token{'s' * (n > 1)} (ms)" for n in token_counts) + " | 1 token: weights read (GB/s) |")
    print("|---|" + "---|" * (len(token_counts) + 1))
    for name in layers:
        med = {n: statistics.median(times[(name, n)]) for n in token_counts}
        cells = " | ".join(f"{med[n] * 1e3:.2f}" for n in token_counts)
        bound = f"{active * elt / med[1] / 1e9:.1f}" if 1 in med else ""
        print(f"| {name} | {cells} | {bound} |")
    dense = "dense MLP, same active width"
    for n in token_counts:
        ratio = statistics.median(times[(dense, n)]) / statistics.median(times[("openglm MoE", n)])
        print(f"MoE speed / dense speed at {n} token{'s' * (n > 1)}: {ratio:.2f}x")


def model_config(name: str) -> Config:
    """A named config, or ``moe-100m``: GLM-4.5-Air's layout at ~100M parameters (end of text: id 0)."""
    if name != "moe-100m":
        return Config.from_name(name, eos_token_id=[0], pad_token_id=0)
    return dataclasses.replace(Config.from_name("glm-4.5-air-debug"), name="moe-100m", vocab_size=32768,
                               hidden_size=768, intermediate_size=2048, num_layers=8, num_heads=12, num_kv_heads=2,
                               head_dim=64, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=256,
                               eos_token_id=[0], pad_token_id=0)


def bench_model(args) -> None:
    tools = llama_cpp_tools.tools(args.llama_cpp, args.build_llama_cpp)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            base, label = Path(args.checkpoint), args.checkpoint
        else:
            model = GLMForCausalLM.from_config(model_config(args.model), seed=0).eval()
            with torch.no_grad():  # end-of-text logit 0, never the largest: every step is generated
                model.lm_head.weight[0] = 0
            base = save_model(model, Path(tmp) / "fp32", tokenizer=load_tokenizer("glm-tiny"))  # GGUF needs a vocabulary
            label = f"{args.model} (random weights)"
        models = {"fp32": load_model(base), "int8": quantize_model(load_model(base), "int8"),
                  "int4": quantize_model(load_model(base), "int4", 32)}
        ggufs = {bits: export_gguf(base, Path(tmp) / f"{t}.gguf", t) for bits, t in GGUF_TYPES.items()} if tools else {}
        config = models["fp32"].config
        tok = word_tokenizer(config.vocab_size)
        n = args.new_tokens
        prompt = torch.randint(1, config.vocab_size, (1, 16)).tolist()
        greedy = SamplingParams(max_new_tokens=n, temperature=0)
        ours, theirs = {bits: [] for bits in models}, {bits: [] for bits in ggufs}
        with torch.inference_mode():
            for model in models.values():  # warm-up
                sum(1 for _ in generate_steps(model, tok, prompt, greedy))
            for _ in range(args.repeats):  # each round: every width, openglm then llama-bench
                for bits, model in models.items():
                    start = time.perf_counter()
                    steps = sum(1 for _ in generate_steps(model, tok, prompt, greedy))
                    ours[bits].append(steps / (time.perf_counter() - start))
                    if bits in ggufs:
                        theirs[bits].append(llama_cpp_tools.llama_bench(tools, ggufs[bits], threads, gen=n, repeats=1)["tg"])
    print(f"\nwhole model {label}: {config.num_parameters / 1e6:.1f}M parameters ({config.num_active_parameters / 1e6:.1f}M "
          f"active), greedy decode, batch 1, {n} new tokens after a 16-token prompt, {threads} threads, median of "
          f"{args.repeats} rounds")
    if not tools:
        print("llama.cpp: llama-bench not found (see bench/llama_cpp_tools.py; --build-llama-cpp builds it), so the "
              "comparison with llama.cpp was not run")
    print(f"| weights | openglm tokens/s | llama-bench tg{n} tokens/s (GGUF type) | openglm / llama-bench |")
    print("|---|---:|---:|---:|")
    for bits in models:
        o = statistics.median(ours[bits])
        t = statistics.median(theirs[bits]) if theirs.get(bits) else None
        print(f"| {bits} | {o:.1f} | " + (f"{t:.1f} ({GGUF_TYPES[bits]}) | {o / t:.2f}x |" if t else "not run | |"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--moe-intermediate", type=int, default=768)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--shared", type=int, default=1)
    ap.add_argument("--tokens", default="1,8,128", help="tokens per layer call (1 = a batch-1 decode step)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    ap.add_argument("--model", default="moe-100m", help="named config (random weights) for the whole-model decode")
    ap.add_argument("--checkpoint", help="an fp32 openglm MoE checkpoint with its tokenizer for the whole-model "
                    "decode (instead of --model)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--llama-cpp", help="folder of llama-bench (default: found as bench/llama_cpp_tools.py finds it)")
    ap.add_argument("--build-llama-cpp", action="store_true", help="build llama-bench if it is not found")
    ap.add_argument("--skip-layer", action="store_true", help="only the whole-model decode")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.skip_layer:
        bench_layers(args)
    bench_model(args)


if __name__ == "__main__":
    main()
