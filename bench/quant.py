"""Decode and prefill speed and peak memory of quantized openglm models versus fp32, transformers and llama.cpp.

    python bench/quant.py [--models glm-4-100m glm-tiny] [--new-tokens 64] [--repeats 3] [--threads N]
                          [--prefill 512] [--llama-cpp DIR | --build-llama-cpp] [--only "openglm int4,llama-bench q4_0"]

For each model (a config name gets random weights, seed 0; a checkpoint path or bundled name is
used as it is) one set of weights is saved once and every configuration reads those: openglm at
fp32, bf16, INT8 and INT4 (group 32, symmetric), eagerly as ``generate()`` runs and (float32
activations) as the compiled decode step of ``generate(..., compile=True)``; transformers at fp32;
llama.cpp (when ``llama-cpp-python`` is installed) on the same weights exported to GGUF f32, q8_0
and q4_0.

Each measurement runs in its own process (so its peak resident memory is its own), configurations
alternate, ``--repeats`` times, and medians are reported with the load average seen. Decode speed
is greedy steps after a 16-token prompt, prefill excluded, at batch 1 and 8 (llama.cpp: batch 1,
its Python API decodes one sequence). The bandwidth bound is this machine's measured memory read
bandwidth divided by the bytes of weights one decode step reads (every matrix but the embedding).

llama.cpp's own ``llama-bench`` (found as bench/llama_cpp_tools.py finds it, or built with
``--build-llama-cpp``) runs on the same GGUF files in the same alternation, with the same threads:
``tg`` (decode, batch 1) and ``pp`` (a ``--prefill``-token prompt). openglm's eager configurations
time the same prefill (one ``--prefill``-token prompt into an empty cache), and the table gives
openglm / llama-bench at the same bits for both: fp32 against f32, INT8 against q8_0 and INT4
(group 32, symmetric) against q4_0 (blocks of 32, symmetric), llama.cpp repacking them into its
CPU layouts as it does by default.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = 16
OPENGLM = {"fp32": ("float32", None), "bf16": ("bfloat16", None), "int8": ("float32", "int8"),
           "int4": ("float32", "int4")}
GGUF_BITS = {"f32": "fp32", "q8_0": "int8", "q4_0": "int4"}


# -- one measurement (a child process) -----------------------------------------------------------

def _peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss it does not carry the parent's over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _decode_rate(step, prefill, n: int) -> float:
    """Steps per second of ``n`` greedy steps after ``prefill()``; ``step(ids) -> next ids``."""
    nxt = prefill()
    t = time.perf_counter()
    for _ in range(n):
        nxt = step(nxt)
    return n / (time.perf_counter() - t)


def worker(spec: dict) -> dict:
    import torch

    if spec["engine"] == "bandwidth":  # its own process: the buffer must not count in a model's peak memory
        return {"bandwidth": measure_bandwidth(spec["threads"])}
    torch.set_num_threads(spec["threads"])
    n, out = spec["new_tokens"], {}
    gen = torch.Generator().manual_seed(0)
    vocab = spec["vocab_size"]
    prompts = torch.randint(1, vocab, (8, PROMPT), generator=gen)
    if spec["engine"] == "llama-bench":
        from llama_cpp_tools import llama_bench

        speeds = llama_bench(Path(spec["tools"]), spec["path"], spec["threads"], spec["prefill"], n, repeats=1)
        return {"b1": speeds["tg"], **({"pp": speeds["pp"]} if "pp" in speeds else {})}
    if spec["engine"] == "llama.cpp":
        import llama_cpp
        import numpy as np

        llm = llama_cpp.Llama(spec["path"], n_ctx=PROMPT + n + 8, n_threads=spec["threads"], verbose=False)

        def prefill():
            llm.reset()
            llm.eval(prompts[0].tolist())
            return int(np.argmax(llm.scores[llm.n_tokens - 1]))

        def step(tok):
            llm.eval([tok])
            return int(np.argmax(llm.scores[llm.n_tokens - 1]))

        _decode_rate(step, prefill, 4)  # warm-up
        out["b1"] = _decode_rate(step, prefill, n)
    else:
        with torch.inference_mode():
            if spec["engine"] == "transformers":
                from transformers import AutoModelForCausalLM, DynamicCache

                model = AutoModelForCausalLM.from_pretrained(spec["path"], dtype=torch.float32).eval()
                state = {}

                def forward(ids):
                    o = model(ids, past_key_values=state["cache"], use_cache=True)
                    return o.logits[:, -1].argmax(-1, keepdim=True)

                def new_cache(B):
                    state["cache"] = DynamicCache(config=model.config)
            elif spec.get("compile"):  # the compiled decode step of generate(..., compile=True)
                from openglm import load_model
                from openglm.infer.generate import _compiled_decode_step
                from openglm.model.glm import use_decode_layout

                model = load_model(spec["path"], dtype=getattr(torch, spec["dtype"]))
                use_decode_layout(model)
                step_fn, total, state = _compiled_decode_step(model), PROMPT + n + 8, {}

                def forward(ids):
                    cache, keys = state["cache"], state["keys"]
                    B, T = ids.shape
                    if T > 1:  # the prefill writes slots 0..T-1 and sees all slots, masked by `keys`
                        cache.slots, keys[:, :T] = torch.arange(T), True
                        logits = model(ids, torch.arange(T).expand(B, T), keys, cache, logits_to_keep=1)[:, -1]
                        cache.slots, state["pos"] = torch.zeros(1, dtype=torch.long), T
                    else:
                        p = state["pos"]
                        keys[:, p] = True
                        cache.slots.fill_(p)
                        logits = step_fn(model, ids, torch.full((B, 1), p), keys[:, None, None], cache, cache.slots)
                        cache.length += 1
                        state["pos"] = p + 1
                    return logits.argmax(-1, keepdim=True)

                def new_cache(B):
                    state["cache"] = model.new_cache(B, total, static=True)
                    state["keys"] = torch.zeros(B, total, dtype=torch.bool)
            else:
                from openglm import load_model
                from openglm.model.glm import use_decode_layout

                model = load_model(spec["path"], dtype=getattr(torch, spec["dtype"]))
                use_decode_layout(model)  # as generate() does
                state = {}

                def forward(ids):
                    return model(ids, cache=state["cache"], logits_to_keep=1)[:, -1].argmax(-1, keepdim=True)

                def new_cache(B):
                    state["cache"] = model.new_cache(B, PROMPT + n + 8)
            out["bytes"] = runtime_bytes(model)
            for B in (1, 8):
                def prefill(B=B):
                    new_cache(B)
                    return forward(prompts[:B])

                _decode_rate(forward, prefill, 4)  # warm-up
                out[f"b{B}"] = B * _decode_rate(forward, prefill, n)  # tokens/s: B rows per step
            out["peak_rss_mib"] = _peak_rss_mib()  # of decoding: before the long prompt's activations
            P = spec.get("prefill", 0)
            if P and spec["engine"] == "openglm" and not spec.get("compile"):  # prefill runs eagerly in all
                long = torch.randint(1, vocab, (1, P), generator=gen)
                model(long, cache=model.new_cache(1, P + 1), logits_to_keep=1)  # warm-up
                t = time.perf_counter()
                model(long, cache=model.new_cache(1, P + 1), logits_to_keep=1)
                out["pp"] = P / (time.perf_counter() - t)
            return out
    out["peak_rss_mib"] = _peak_rss_mib()
    return out


def runtime_bytes(model) -> int:
    """Bytes of the tensors one decode step reads: all but the token embeddings (one row is read)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()] if t is not None}
    for name in ("model.embed_tokens", "embed_tokens"):
        try:
            emb = model.get_submodule(name)
        except AttributeError:
            continue
        for t in [*emb.parameters(), *emb.buffers()]:
            tensors.pop(id(t), None)
    return sum(t.numel() * t.element_size() for t in tensors.values())


# -- preparing the weights -------------------------------------------------------------------------

def gguf_bytes_per_token(path: Path) -> int:
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors if t.name != "token_embd.weight")


def prepare(model_name: str, directory: Path, python_llama: bool, compile: bool = True,
            tools: Path | None = None) -> dict[str, dict]:
    """Save the weights each configuration reads; returns {config: {engine, path, dtype, bytes}}.

    GGUF files are written for llama.cpp through llama-cpp-python (``python_llama``) and for
    ``llama-bench`` (``tools``, its folder)."""
    import torch

    from openglm import GLMForCausalLM, load_model, save_model
    from openglm.config import CONFIGS, Config
    from openglm.quant import quantize_model
    from openglm.quant.gguf import export_gguf

    base = directory / "fp32"
    if model_name in CONFIGS:  # random weights; end-of-text logit 0 so that nothing depends on when it wins
        config = Config.from_name(model_name, eos_token_id=[0], pad_token_id=0)
        model = GLMForCausalLM.from_config(config, seed=0).eval()
        with torch.no_grad():
            model.lm_head.weight[0] = 0
        from openglm.data.tokenizer import load_tokenizer

        # The bundled tokenizer, so that llama.cpp gets a vocabulary (GGUF pads it to the model's).
        save_model(model, base, tokenizer=load_tokenizer("glm-tiny"))
    else:
        model = load_model(model_name, dtype=torch.float32)
        from openglm.data.tokenizer import load_tokenizer

        save_model(model, base, tokenizer=load_tokenizer(model_name))
    vocab = model.config.vocab_size
    configs = {}
    for name, (dtype, scheme) in OPENGLM.items():
        path = base
        if scheme:
            path = save_model(quantize_model(load_model(base), scheme, 32), directory / name)
        configs[f"openglm {name}"] = {"engine": "openglm", "path": str(path), "dtype": dtype}
        if compile and dtype == "float32":  # bf16 compiles to slow code on CPUs without bf16 arithmetic
            configs[f"openglm {name} compiled"] = {"engine": "openglm", "path": str(path), "dtype": dtype, "compile": True}
    configs["transformers fp32"] = {"engine": "transformers", "path": str(base)}
    if (base / "tokenizer.json").is_file():
        for t in GGUF_BITS if python_llama or tools else []:
            path = export_gguf(base, directory / f"{t}.gguf", t)
            if python_llama:
                configs[f"llama.cpp {t}"] = {"engine": "llama.cpp", "path": str(path), "bytes": gguf_bytes_per_token(path)}
            if tools:
                configs[f"llama-bench {t}"] = {"engine": "llama-bench", "path": str(path), "tools": str(tools),
                                               "bytes": gguf_bytes_per_token(path)}
    for c in configs.values():
        c["vocab_size"] = vocab
    return configs


def measure_bandwidth(threads: int) -> float:
    """Memory read bandwidth in bytes/s: best of 5 sums over a 256 MiB buffer (sets torch's threads)."""
    import torch

    torch.set_num_threads(threads)
    a = torch.ones(2**26)
    a.sum()
    best = min(_timed(a.sum) for _ in range(5))
    return a.nbytes / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# -- the run -----------------------------------------------------------------------------------------

def run_child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(model_name: str, configs: dict, runs: dict, bandwidths: list[float], loads: list[float],
           prefill: int) -> str:
    # The machine's bandwidth is the best measurement; busy moments only lower one.
    bandwidth = max(bandwidths)
    med = {}
    for name, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        med[name] = {k: statistics.median(r[k] for r in ok) for k in ("b1", "b8", "pp", "peak_rss_mib", "bytes")
                     if ok and k in ok[0]}
        if not ok:
            med[name]["error"] = rs[0]["error"]
    fp32 = med.get("openglm fp32", {})
    lines = [f"### {model_name}", "",
             f"median of {len(next(iter(runs.values())))} alternating runs; 1-min load average during the runs: "
             f"{min(loads):.1f}-{max(loads):.1f}; memory read bandwidth {bandwidth / 1e9:.1f} GB/s "
             f"(best of {len(bandwidths)}, measured between the runs)", "",
             "| configuration | MiB read / token | decode tok/s, batch 1 | batch 8 | vs openglm fp32 (b1 / b8) "
             f"| % of bandwidth bound (b1) | vs llama.cpp same bits (b1) | prefill tok/s ({prefill} tokens) "
             "| vs llama-bench same bits (decode / prefill) | peak RSS MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    llama_by_bits = {GGUF_BITS[n.split()[1]]: med[n].get("b1") for n in med if n.startswith("llama.cpp")}
    bench_by_bits = {GGUF_BITS[n.split()[1]]: med[n] for n in med if n.startswith("llama-bench") and "b1" in med[n]}
    for name, c in configs.items():
        m = med[name]
        if "error" in m:
            lines.append(f"| {name} | | failed: {m['error'][:80]} | | | | | | | |")
            continue
        b1, b8, nbytes = m["b1"], m.get("b8"), c.get("bytes") or m["bytes"]
        rel = f"{b1 / fp32['b1']:.2f}x" + (f" / {b8 / fp32['b8']:.2f}x" if b8 and fp32.get("b8") else "") if fp32 else ""
        bits = name.split()[1]
        peer = llama_by_bits.get(bits) if name.startswith("openglm") else None
        bench = bench_by_bits.get(bits, {}) if name.startswith("openglm") else {}
        vs_bench = " / ".join(f"{m[k] / bench[k]:.2f}x" if k in m and k in bench else "-" for k in ("b1", "pp"))
        pp = m.get("pp")
        rss = f"{m['peak_rss_mib']:.0f}" if "peak_rss_mib" in m else ""  # llama-bench's is its own process's
        lines.append(f"| {name} | {nbytes / 2**20:.1f} | {b1:.1f} | {f'{b8:.1f}' if b8 else 'n/a'} | {rel} | "
                     f"{100 * b1 * nbytes / bandwidth:.0f}% | {f'{b1 / peer:.2f}x' if peer else ''} | "
                     f"{f'{pp:.0f}' if pp else ''} | {vs_bench if bench else ''} | {rss} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["glm-4-100m", "glm-tiny"],
                    help="config names (random weights) or checkpoints (default: glm-4-100m and the bundled glm-tiny)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled decode configurations")
    ap.add_argument("--prefill", type=int, default=512, help="prompt tokens of the prefill measurement (0: none)")
    ap.add_argument("--llama-cpp", help="folder of llama-bench (default: found as bench/llama_cpp_tools.py finds it)")
    ap.add_argument("--build-llama-cpp", action="store_true", help="build llama-bench if it is not found")
    ap.add_argument("--only", help="comma-separated configurations to run, e.g. 'openglm int4,llama-bench q4_0'")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    try:
        import llama_cpp  # noqa: F401

        python_llama = True
    except ImportError:
        python_llama = False
        print("llama-cpp-python is not installed: no llama.cpp rows")
    import llama_cpp_tools

    tools = llama_cpp_tools.tools(args.llama_cpp, args.build_llama_cpp)
    if tools is None:
        print("llama-bench not found (see bench/llama_cpp_tools.py; --build-llama-cpp builds it): no llama-bench rows")
    import torch

    print(f"torch {torch.__version__}, {args.threads} threads, {args.new_tokens} new tokens after a {PROMPT}-token "
          f"prompt\n")
    for model_name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            configs = prepare(model_name, Path(tmp), python_llama, not args.no_compile, tools)
            if args.only:
                wanted = [c.strip() for c in args.only.split(",")]
                if missing := [c for c in wanted if c not in configs]:
                    raise SystemExit(f"error: no configuration {missing[0]!r}; there are: {', '.join(configs)}")
                configs = {name: c for name, c in configs.items() if name in wanted}
            runs, loads, bandwidths = {name: [] for name in configs}, [], []
            for _ in range(args.repeats):
                bandwidths.append(run_child({"engine": "bandwidth", "threads": args.threads})["bandwidth"])
                for name, c in configs.items():
                    spec = {**c, "threads": args.threads, "new_tokens": args.new_tokens, "prefill": args.prefill}
                    runs[name].append(run_child(spec))
                    loads.append(os.getloadavg()[0])
            print(report(model_name, configs, runs, bandwidths, loads, args.prefill) + "\n", flush=True)


if __name__ == "__main__":
    main()
