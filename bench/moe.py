"""Speed of openglm's mixture-of-experts layer versus a dense MLP of the same active parameters, and of
a whole MoE model's batch-1 decode (against llama.cpp's ``llama-bench`` on the same GGUF when it is installed).

    python bench/moe.py [--hidden 2048] [--moe-intermediate 768] [--experts 32] [--top-k 8] [--shared 1]
                        [--tokens 1,8,128] [--repeats 7] [--dtype float32] [--threads N] [--model glm-4.5-air-debug]
                        [--checkpoint DIR --gguf FILE]

Layer: the MoE block (router, ``--experts`` routed experts of width ``--moe-intermediate``, ``--top-k``
per token, ``--shared`` shared experts) against one dense SwiGLU MLP of width ``(top-k + shared) x
moe-intermediate``, i.e. the same weights per token (the router's few extra are listed). Also
``transformers``' ``Glm4MoeMoE`` on the same weights, when transformers is installed. Each row is
the median over ``--repeats`` runs, every configuration measured in turn so a busy machine slows all
alike. One token is a decode step at batch 1: it reads only the chosen experts, so its speed is also
given as weights read per second, next to the memory read bandwidth measured with the same threads
(bench/bandwidth.py).

Whole model: greedy batch-1 decode of ``--checkpoint`` (default: random weights of ``--model``) with
openglm, and ``llama-bench -p 0 -n N`` on ``--gguf`` (the same weights exported with ``openglm convert
--to gguf``) when ``llama-bench`` is on PATH; otherwise that comparison is reported as not run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from openglm import Config, GLMForCausalLM, SamplingParams, load_model  # noqa: E402
from openglm.infer.generate import generate_steps  # noqa: E402
from openglm.model.glm import MLP, MoE  # noqa: E402

from bandwidth import measure_bandwidth  # noqa: E402
from decode import word_tokenizer  # noqa: E402


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


def bench_model(args) -> None:
    if args.checkpoint:
        model = load_model(args.checkpoint)
        label = args.checkpoint
    else:
        config = Config.from_name(args.model, eos_token_id=[0], pad_token_id=0)
        model = GLMForCausalLM.from_config(config, seed=0).eval()
        with torch.no_grad():  # end-of-text logit 0, never the largest: every step is generated
            model.lm_head.weight[0] = 0
        label = f"{args.model} (random weights)"
    config = model.config
    tok = word_tokenizer(config.vocab_size)
    n = args.new_tokens
    prompt = torch.randint(1, config.vocab_size, (1, 16)).tolist()
    greedy = SamplingParams(max_new_tokens=n, temperature=0)

    def run():
        assert sum(1 for _ in generate_steps(model, tok, prompt, greedy)) <= n

    with torch.inference_mode():
        run()
        seconds = median_time(run, args.repeats)
    print(f"whole model {label}: {config.num_parameters / 1e6:.1f}M parameters ({config.num_active_parameters / 1e6:.1f}M active)")
    print(f"openglm greedy decode, batch 1, {n} new tokens after a 16-token prompt: {n / seconds:.1f} tokens/s")
    llama_bench = shutil.which("llama-bench")
    if llama_bench is None:
        print("llama.cpp: llama-bench is not on PATH here, so the comparison with llama.cpp was not run")
        return
    if not args.gguf:
        print(f"llama.cpp: {llama_bench} found, but no --gguf given (export the same checkpoint with "
              "`openglm convert --to gguf`), so the comparison with llama.cpp was not run")
        return
    out = subprocess.run([llama_bench, "-m", args.gguf, "-p", "0", "-n", str(n), "-t", str(torch.get_num_threads()),
                          "-r", str(args.repeats), "-o", "json"], capture_output=True, text=True, check=True)
    tps = json.loads(out.stdout)[0]["avg_ts"]
    print(f"llama.cpp llama-bench tg{n} on {args.gguf}: {tps:.1f} tokens/s; openglm / llama.cpp: {n / seconds / tps:.2f}x")


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
    ap.add_argument("--model", default="glm-4.5-air-debug", help="named config for the whole-model decode")
    ap.add_argument("--checkpoint", help="an openglm MoE checkpoint for the whole-model decode (instead of --model)")
    ap.add_argument("--gguf", help="the same weights as GGUF, for llama-bench")
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bench_layers(args)
    bench_model(args)


if __name__ == "__main__":
    main()
