"""Decode and prefill speed of openglm versus transformers on the same random GLM-4 weights.

    python bench/decode.py [--config glm-4-100m] [--new-tokens 128] [--prompt 512] [--repeats 3] [--batch 1,4]
                           [--llama-cpp DIR | --build-llama-cpp | --no-llama-bench]
    python bench/decode.py --mla [--steps 16] [--repeats 3]

``--mla`` instead compares multi-head latent attention with grouped-query attention at the same size:
``glm-4-100m`` (GQA, 2 KV heads of 64) against the same network with MLA attention (latent 128 + rotary
key 32 per layer), decoding at batch 1 and 16 after 256 and 2048 tokens of context. The caches are
filled with random values up to the context (a decode step's cost depends on how many keys it reads,
not on their values), then ``--steps`` greedy steps are timed; it reports tokens/s and the KV cache
memory of the whole batch.

Both run fp32 on the CPU with the same thread count. Every configuration is measured in turn,
repeats times, and the median of each is reported, so a busy machine slows all alike. openglm
decodes eagerly and with its compiled decode step (``compile=True``; compiled once before timing).
Decode speed is also given as a fraction of the bandwidth bound: a decode step reads every weight
once, so steps/s <= memory read bandwidth (bench/bandwidth.py) / bytes of weights.

llama.cpp's ``llama-bench`` (found as bench/llama_cpp_tools.py finds it, or built with
``--build-llama-cpp``) runs in the same alternation on the same weights exported with ``openglm
convert --to gguf`` at f32, with the same thread count: ``tg`` ``--new-tokens`` (batch-1 decode)
and ``pp`` ``--prompt`` (prefill), each once per round; the table gives openglm / llama-bench.
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
from tokenizers import Tokenizer, models

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from openglm import Config, GLMForCausalLM, SamplingParams, save_model  # noqa: E402
from openglm.data.tokenizer import Tokenizer as GLMTokenizer  # noqa: E402
from openglm.data.tokenizer import load_tokenizer  # noqa: E402
from openglm.infer.generate import generate_steps  # noqa: E402
from openglm.quant.gguf import export_gguf  # noqa: E402

import llama_cpp_tools  # noqa: E402
from bandwidth import measure_bandwidth  # noqa: E402


def word_tokenizer(vocab_size: int) -> GLMTokenizer:
    """A word-level tokenizer: decoding is trivial, so the figures are the model's and the loop's."""
    return GLMTokenizer(Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0")))


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def mla_config(gqa: Config) -> Config:
    """``gqa`` with multi-head latent attention of about the same parameters (dense MLPs, no experts)."""
    return dataclasses.replace(gqa, name=f"{gqa.name}-mla", num_kv_heads=gqa.num_heads, head_dim=96, partial_rotary_factor=1.0,
                               post_norms=False, attention_bias=False, kv_lora_rank=128, qk_nope_head_dim=64,
                               qk_rope_head_dim=32, v_head_dim=64, mlp_layer_types=None)


def mla_vs_gqa(args) -> None:
    gqa = Config.from_name("glm-4-100m")
    rows = []
    models = {name: GLMForCausalLM.from_config(c, seed=0).eval() for name, c in (("GQA", gqa), ("MLA", mla_config(gqa)))}
    cases = [(name, b, ctx) for ctx in (256, 2048) for b in (1, 16) for name in models]
    times = {case: [] for case in cases}
    caches = {}
    with torch.inference_mode():
        for _ in range(args.repeats + 1):  # the first round warms up
            for case in cases:
                name, b, ctx = case
                model = models[name]
                if case not in caches:
                    cache = caches[case] = model.new_cache(b, ctx + args.steps)
                    for buf in cache.buffers():
                        buf.normal_()
                cache = caches[case]
                tokens = torch.randint(0, gqa.vocab_size, (b, 1))
                cache.length = ctx

                def run():
                    nonlocal tokens
                    for _ in range(args.steps):
                        tokens = model(tokens, cache=cache)[:, -1].argmax(-1, keepdim=True)
                times[case] += timed(run, 1)
            if _ == 0:
                times = {case: [] for case in cases}
    print(f"fp32, {torch.get_num_threads()} threads, torch {torch.__version__}, {args.steps} decode steps, median of {args.repeats}")
    print("| attention | parameters | batch | context | tokens/s | KV cache (fp32) | KV cache per token (bf16) |")
    print("|---|---|---|---|---|---|---|")
    for case in cases:
        name, b, ctx = case
        model, cache = models[name], caches[case]
        kv = sum(buf.numel() * buf.element_size() for buf in cache.buffers()) * ctx / cache.max_length
        per = model.config.kv_cache_bytes_per_token
        rows.append(f"| {name} | {model.config.num_parameters / 1e6:.1f}M | {b} | {ctx} | "
                    f"{b * args.steps / statistics.median(times[case]):.1f} | {kv / 2**20:.1f} MiB | {per / 1024:.1f} KiB |")
    print("\n".join(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="glm-4-100m")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=512, help="prompt length for the prefill measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", default="1,4", help="batch sizes for openglm decode (transformers: batch 1)")
    ap.add_argument("--mla", action="store_true", help="compare latent (MLA) and grouped-query attention instead")
    ap.add_argument("--steps", type=int, default=16, help="--mla: decode steps timed per measurement")
    ap.add_argument("--llama-cpp", help="folder of llama-bench (default: found as bench/llama_cpp_tools.py finds it)")
    ap.add_argument("--build-llama-cpp", action="store_true", help="build llama-bench if it is not found")
    ap.add_argument("--no-llama-bench", action="store_true", help="skip the llama-bench comparison")
    args = ap.parse_args()
    if args.mla:
        return mla_vs_gqa(args)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    eos = 0
    config = Config.from_name(args.config, eos_token_id=[eos], pad_token_id=eos)
    ours = GLMForCausalLM.from_config(config, seed=0).eval()
    with torch.no_grad():  # end-of-text logit 0, never the largest: both sides generate every token
        ours.lm_head.weight[eos] = 0
    tools = None if args.no_llama_bench else llama_cpp_tools.tools(args.llama_cpp, args.build_llama_cpp)
    work = tempfile.TemporaryDirectory()
    gguf = None
    save_model(ours, Path(work.name) / "m", tokenizer=load_tokenizer("glm-tiny"))  # llama.cpp needs a vocabulary
    hf = AutoModelForCausalLM.from_pretrained(Path(work.name) / "m").eval()
    if tools:
        gguf = export_gguf(Path(work.name) / "m", Path(work.name) / "m.gguf", "f32")
    tok = word_tokenizer(config.vocab_size)
    n = args.new_tokens
    batches = [int(b) for b in args.batch.split(",")]
    short = torch.randint(0, config.vocab_size, (max(batches), 16))
    long = torch.randint(0, config.vocab_size, (1, args.prompt))
    greedy = SamplingParams(max_new_tokens=n, temperature=0)

    def ours_decode(batch, compile):
        def run():
            steps = sum(1 for _ in generate_steps(ours, tok, short[:batch].tolist(), greedy, compile=compile))
            assert steps == batch * n
        return run

    def hf_decode():
        out = hf.generate(short[:1], attention_mask=torch.ones_like(short[:1]), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False)
        assert out.shape[1] == short.shape[1] + n

    def ours_prefill():
        ours(long, cache=ours.new_cache(1, args.prompt + 1), logits_to_keep=1)

    def hf_prefill():
        hf(long, use_cache=True, logits_to_keep=1)

    # Prefill is measured apart from decode: generate() times include one short prefill.
    runs = {"hf_decode": hf_decode, "ours_prefill": ours_prefill, "hf_prefill": hf_prefill}
    batches = sorted(set(batches) | ({1} if gguf else set()))  # batch 1 is what llama-bench's tg is compared to
    for b in batches:
        runs[f"eager_b{b}"] = ours_decode(b, False)
        runs[f"compiled_b{b}"] = ours_decode(b, True)
    with torch.inference_mode():
        for fn in runs.values():  # warm-up, and the compilations
            fn()
        times = {k: [] for k in runs}
        peer = {"tg": [], "pp": []}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                times[name] += timed(fn, 1)
            if gguf:
                speeds = llama_cpp_tools.llama_bench(tools, gguf, torch.get_num_threads(), args.prompt, n, repeats=1)
                for k in peer:
                    peer[k].append(speeds[k])
    work.cleanup()
    bandwidth = measure_bandwidth()
    med = {k: statistics.median(v) for k, v in times.items()}
    weights = sum(p.numel() * p.element_size() for p in ours.parameters()) - ours.model.embed_tokens.weight.nbytes
    bound = bandwidth / weights  # decode steps/s if weights streamed at the measured bandwidth
    dec_h = n / med["hf_decode"]
    pre_o, pre_h = args.prompt / med["ours_prefill"], args.prompt / med["hf_prefill"]

    print(f"config {args.config}: {config.num_parameters / 1e6:.1f}M parameters, fp32, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"weights read per decode step: {weights / 2**20:.0f} MiB; memory read bandwidth {bandwidth / 1e9:.1f} GB/s "
          f"-> bound {bound:.1f} steps/s")
    print("| measurement | openglm | transformers | ratio | of bandwidth bound |")
    print("|---|---|---|---|---|")
    for b in batches:
        for kind in ("eager", "compiled"):
            steps = n / med[f"{kind}_b{b}"]
            ratio = f"{steps / dec_h:.2f}x" if b == 1 else ""
            hf_cell = f"{dec_h:.1f}" if b == 1 else ""
            print(f"| greedy decode {kind}, batch {b}, {n} new tokens (tokens/s) | {b * steps:.1f} | {hf_cell} | {ratio} "
                  f"| {steps / bound:.0%} |")
    print(f"| prefill, {args.prompt}-token prompt (tokens/s) | {pre_o:.0f} | {pre_h:.0f} | {pre_o / pre_h:.2f}x | |")
    print(f"transformers decode, batch 1: {dec_h / bound:.0%} of the bandwidth bound")
    if not gguf:
        print("llama-bench: not run (not found; see bench/llama_cpp_tools.py, or --build-llama-cpp)")
        return
    tg, pp = statistics.median(peer["tg"]), statistics.median(peer["pp"])
    eager, compiled = n / med["eager_b1"], n / med["compiled_b1"]
    print(f"\nllama.cpp llama-bench on the same weights as GGUF f32, {torch.get_num_threads()} threads ({tools}):")
    print("| measurement | openglm | llama-bench | openglm / llama-bench |")
    print("|---|---|---|---|")
    print(f"| decode, batch 1 (tokens/s; llama-bench tg{n}), eager | {eager:.1f} | {tg:.1f} | {eager / tg:.2f}x |")
    print(f"| decode, batch 1, compiled | {compiled:.1f} | {tg:.1f} | {compiled / tg:.2f}x |")
    print(f"| prefill, {args.prompt}-token prompt (tokens/s; llama-bench pp{args.prompt}) | {pre_o:.0f} | {pp:.0f} | "
          f"{pre_o / pp:.2f}x |")


if __name__ == "__main__":
    main()
