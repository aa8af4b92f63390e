"""Serving benchmark: continuous batching versus one request at a time, like vLLM's serving benchmark.

    python bench/serve.py [--model glm-tiny] [--concurrency 1,4,16] [--max-tokens 64] [--prompts-per-client 8]
                          [--min-requests 32] [--server-args "--engine-in-process"]
    python bench/serve.py --upstreams N [--model glm-tiny] [--concurrency 1,4,16] ...
    python bench/serve.py --peer llama-server [--model glm-tiny | --random-weights glm-4-100m] [--concurrency 1,16]
                          [--llama-cpp DIR | --build-llama-cpp] [--rounds 1]

Starts two ``openglm serve`` processes on free ports, each on a fresh SQLite database (its demo key):
one with continuous batching (``--max-batch-size 16``) and one limited to one request at a time
(``--max-batch-size 1``). Against each, at each concurrency C, C clients send streamed completions
back to back (C x prompts-per-client requests, at least min-requests; ``--request-rate`` instead
spaces the requests as a Poisson process, C at most in flight). Reported, as vLLM does: request and output-token throughput,
time to first token (TTFT), time per output token TPOT = (latency - TTFT) / (output tokens - 1), and
inter-token latency (ITL, between consecutive streamed chunks: a token that completes no printable
text, such as half a UTF-8 character, joins the next), p50 and p99. Goals: >= 4x output-token throughput at concurrency 16, and TTFT
p50 at concurrency 16 under 2x its value at concurrency 1 (with continuous batching).

With ``--upstreams N`` it measures the gateway instead: one ``openglm serve --upstream ...`` over N
``openglm worker`` processes (each with ``--threads``/N torch threads) against one ``openglm serve``
(``--threads``), at each concurrency; then the gateway's added time to first token: requests at
concurrency 1, alternately straight to a worker and through the gateway (same worker, key checks,
reservation and settlement in SQLite) and to an ``openglm serve`` like one worker (billing, no hop):
p50 of each and of the paired differences (goal < 1 ms p50), and the gateway process's CPU time per
request, which the machine's other load does not inflate as it does latencies.

``--peer llama-server`` instead compares ``openglm serve`` (continuous batching, ``--batch-size``)
with llama.cpp's ``llama-server`` on the same weights: the model is exported with ``openglm convert
--to gguf --gguf-type f32`` and served by ``llama-server --parallel <batch-size>`` (its continuous
batching, a context of ``batch-size x (max-tokens + 256)`` tokens shared by the slots) with the same
thread count; both run at once, idle while the other is measured, and at each concurrency the two
are measured in turn, each request on a new loopback connection, (the order alternating, ``--rounds`` times) under the same streamed
``/v1/completions`` load. It prints both rows and the ratios openglm / llama-server (output
tokens/s: higher is better for openglm; TTFT p50: lower is). llama.cpp's tools are found or built as
bench/llama_cpp_tools.py does. ``--random-weights CONFIG`` serves random weights of a named config
(end-of-text logit 0) instead of ``--model``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PROMPTS = [
    "The General Language Model fills blanks in text",
    "Once upon a time, in a small village by the sea,",
    "The history of the printing press begins",
    "通用语言模型通过自回归空白填充进行预训练",
    "A simple recipe for bread needs flour, water,",
    "In mathematics, a prime number is",
    "The weather tomorrow will be",
    "人工智能的发展历史可以追溯到",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """An ``openglm`` command in a subprocess on a free port, healthy; ``key``: the API key it printed, if any."""

    def __init__(self, *args: str, expect_key: bool = False):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "openglm", *args, "--port", str(self.port),
                                      "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.key = None
        if expect_key:
            for line in self.proc.stdout:
                if m := re.match(r"API key: (\S+)", line):
                    self.key = m.group(1)
                    break
            if self.key is None:
                raise SystemExit(f"openglm {args[0]} printed no API key (exit code {self.proc.wait()})")
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit(f"openglm {args[0]} did not become healthy")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def Server(model: str, max_batch_size: int, workdir: str, threads: int, extra: list[str] = ()) -> Process:
    """``openglm serve`` on ``model`` (served as ``bench``) with a fresh SQLite database; ``key``: its demo key."""
    return Process("serve", "--model", model, "--served-model-name", "bench",
                   "--db", f"sqlite:///{workdir}/bs{max_batch_size}.db", "--max-batch-size", str(max_batch_size),
                   "--threads", str(threads), *extra, expect_key=True)


@dataclass
class Result:
    latency: float
    ttft: float
    output_tokens: int
    itl: list[float] = field(default_factory=list)


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, seed: int) -> Result:
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "seed": seed,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    times, tokens = [], 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            choice = event["choices"][0] if event.get("choices") else {}
            if choice.get("text") or choice.get("finish_reason"):  # a token's text, or the last token's finish reason
                times.append(time.perf_counter())
            if event.get("usage"):  # llama-server sends it on the finish_reason chunk; openglm on its own
                tokens = event["usage"]["completion_tokens"]
    end = time.perf_counter()
    return Result(end - start, times[0] - start, tokens, [b - a for a, b in zip(times, times[1:])])


async def run_level(url: str, key: str, concurrency: int, n: int, max_tokens: int, rate: float,
                    keepalive: bool = True) -> tuple[list, float]:
    """``n`` requests with at most ``concurrency`` in flight; returns (results, wall seconds).

    ``keepalive=False``: a new connection per request (a server may close an idle kept-alive one
    just as the client reuses it, failing the request unsent: seen with two servers side by side)."""
    rng = random.Random(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency if keepalive else 0)
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=600, limits=limits) as client:
        async def task(i: int, delay: float) -> Result:
            await asyncio.sleep(delay)
            async with gate:
                return await one_request(client, url, PROMPTS[i % len(PROMPTS)], max_tokens, i)

        delays, t = [], 0.0
        for _ in range(n):
            delays.append(t)
            if rate != float("inf"):
                t += rng.expovariate(rate)
        start = time.perf_counter()
        results = await asyncio.gather(*(task(i, d) for i, d in enumerate(delays)))
        return results, time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def summarize(results: list[Result], wall: float) -> dict:
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in results if r.output_tokens > 1]
    itl = [x for r in results for x in r.itl]
    ttft = [r.ttft for r in results]
    return {"req_s": len(results) / wall, "tok_s": sum(r.output_tokens for r in results) / wall,
            "ttft50": pct(ttft, 50), "ttft99": pct(ttft, 99), "tpot50": pct(tpot, 50), "tpot99": pct(tpot, 99),
            "itl50": pct(itl, 50), "itl99": pct(itl, 99),
            "out_len": statistics.mean(r.output_tokens for r in results)}


class LlamaServer:
    """llama.cpp's ``llama-server`` on ``gguf`` in a subprocess (no key: the bearer header is ignored)."""

    def __init__(self, tools, gguf: Path, threads: int, parallel: int, context: int, log: Path):
        import llama_cpp_tools

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = "none"
        self.log = log
        command = llama_cpp_tools.server_command(tools, gguf, self.port, threads, parallel, context)
        with open(log, "w") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:  # /health answers 503 while the model loads
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit(f"llama-server did not become healthy; its log: {log}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def prepare_model(args, workdir: Path) -> str:
    """The checkpoint both servers serve: ``--model``, or random weights of ``--random-weights`` saved in ``workdir``."""
    if not args.random_weights:
        return args.model
    import torch

    from openglm import Config, GLMForCausalLM, save_model
    from openglm.data.tokenizer import load_tokenizer

    config = Config.from_name(args.random_weights, eos_token_id=[0], pad_token_id=0)
    model = GLMForCausalLM.from_config(config, seed=0).eval()
    with torch.no_grad():  # end-of-text logit 0: rarely the one sampled, so requests run to max_tokens
        model.lm_head.weight[0] = 0
    return str(save_model(model, workdir / "random", tokenizer=load_tokenizer("glm-tiny")))


def peer_run(args, levels: list[int]) -> None:
    """openglm serve and llama-server on the same weights, measured in turn at each concurrency."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import llama_cpp_tools

    tools = llama_cpp_tools.tools(args.llama_cpp, args.build_llama_cpp)
    if tools is None:
        raise SystemExit("error: llama-server not found (see bench/llama_cpp_tools.py; --build-llama-cpp builds it)")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = prepare_model(args, workdir)
        gguf = workdir / "model.gguf"
        done = subprocess.run([sys.executable, "-m", "openglm", "convert", model, "--to", "gguf", "--gguf-type", "f32",
                               "-o", str(gguf)], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"openglm convert --to gguf failed: {done.stderr.strip()[-500:]}")
        context = args.batch_size * (args.max_tokens + 256)
        servers = {}
        try:
            servers["openglm"] = Server(model, args.batch_size, tmp, args.threads, args.server_args.split())
            servers["llama-server"] = LlamaServer(tools, gguf, args.threads, args.batch_size, context,
                                                  workdir / "llama-server.log")
            for server in servers.values():
                asyncio.run(run_level(server.url, server.key, 1, 2, 8, float("inf"), keepalive=False))  # warm-up
            order = list(servers)
            for c in levels:
                n = max(c * args.prompts_per_client, args.min_requests)
                for _ in range(args.rounds):
                    for label in order:
                        server = servers[label]
                        results, wall = asyncio.run(run_level(server.url, server.key, c, n, args.max_tokens,
                                                              args.request_rate, keepalive=False))
                        rows.setdefault((label, c), []).append(summarize(results, wall))
                        r = rows[label, c][-1]
                        print(f"{label:>14} c={c:<3} {r['tok_s']:8.1f} tok/s  TTFT p50 {r['ttft50'] * 1000:7.1f} ms  "
                              f"load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
                    order.reverse()  # the other goes first next time
        finally:
            for server in servers.values():
                server.stop()
    name = f"{args.random_weights} (random weights)" if args.random_weights else args.model
    print(f"\nmodel {name}, f32 GGUF for llama-server, {args.max_tokens} max tokens, {os.cpu_count()} CPUs, "
          f"{args.threads} threads each, {args.batch_size} slots each; medians of {args.rounds} round(s); "
          f"1-min load average at the end {os.getloadavg()[0]:.1f}; times in ms")
    print("| server | concurrency | req/s | output tok/s | out len | TTFT p50 | TTFT p99 | TPOT p50 | ITL p50 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    med = {key: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for key, rs in rows.items()}
    for (label, c), r in med.items():
        print(f"| {label} | {c} | {r['req_s']:.2f} | {r['tok_s']:.1f} | {r['out_len']:.1f} | {r['ttft50'] * 1e3:.1f} | "
              f"{r['ttft99'] * 1e3:.1f} | {r['tpot50'] * 1e3:.1f} | {r['itl50'] * 1e3:.1f} |")
    print("\n| concurrency | output tok/s, openglm / llama-server | TTFT p50, openglm / llama-server |")
    print("|---:|---:|---:|")
    for c in levels:
        ours, peer = med["openglm", c], med["llama-server", c]
        print(f"| {c} | {ours['tok_s'] / peer['tok_s']:.2f}x ({ours['tok_s']:.0f} vs {peer['tok_s']:.0f}) | "
              f"{ours['ttft50'] / peer['ttft50']:.2f}x ({ours['ttft50'] * 1e3:.1f} vs {peer['ttft50'] * 1e3:.1f} ms) |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="glm-tiny", help="checkpoint directory or bundled name")
    ap.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts")
    ap.add_argument("--max-tokens", type=int, default=64, help="completion tokens per request (at most)")
    ap.add_argument("--prompts-per-client", type=int, default=8, help="requests per level = this x concurrency")
    ap.add_argument("--min-requests", type=int, default=32,
                    help="requests per level at least (so that low concurrency levels get stable medians too)")
    ap.add_argument("--request-rate", type=float, default=float("inf"),
                    help="requests per second, Poisson arrivals (default: all at once, concurrency-limited)")
    ap.add_argument("--batch-size", type=int, default=16, help="--max-batch-size of the batching server")
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                    help="torch threads of the server (default: all CPUs but one, which the clients use)")
    ap.add_argument("--server-args", default="", help="more `openglm serve` flags for both servers, e.g. "
                    "'--engine-in-process' or '--preempt-tokens 0'")
    ap.add_argument("--upstreams", type=int, default=0,
                    help="measure a gateway over this many `openglm worker`s against one `openglm serve`, and "
                         "the gateway's added time to first token")
    ap.add_argument("--ttft-pairs", type=int, default=100, help="requests each way for the added TTFT (--upstreams)")
    ap.add_argument("--peer", choices=["llama-server"], help="compare with llama.cpp's server instead")
    ap.add_argument("--random-weights", metavar="CONFIG", help="--peer: serve random weights of this named config")
    ap.add_argument("--rounds", type=int, default=1, help="--peer: measurements of each server per concurrency")
    ap.add_argument("--llama-cpp", help="--peer: folder of llama-server (default: found as bench/llama_cpp_tools.py does)")
    ap.add_argument("--build-llama-cpp", action="store_true", help="--peer: build llama-server if it is not found")
    args = ap.parse_args()
    if args.peer:
        if args.concurrency == ap.get_default("concurrency"):
            args.concurrency = "1,16"
        return peer_run(args, [int(c) for c in args.concurrency.split(",")])
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.upstreams:
        return bench_gateway(args, levels)

    rows = {}
    with tempfile.TemporaryDirectory() as workdir:
        for label, batch in (("batched", args.batch_size), ("one-at-a-time", 1)):
            server = Server(args.model, batch, workdir, args.threads, args.server_args.split())
            try:
                asyncio.run(run_level(server.url, server.key, 1, 2, 8, float("inf")))  # warm-up
                for c in levels:
                    n = max(c * args.prompts_per_client, args.min_requests)
                    results, wall = asyncio.run(run_level(server.url, server.key, c, n, args.max_tokens,
                                                          args.request_rate))
                    rows[label, c] = summarize(results, wall)
                    r = rows[label, c]
                    print(f"{label:>14} c={c:<3} {r['tok_s']:8.1f} tok/s  TTFT p50 {r['ttft50'] * 1000:7.1f} ms",
                          file=sys.stderr, flush=True)
            finally:
                server.stop()

    print(f"\nmodel {args.model}, {args.max_tokens} max tokens, {os.cpu_count()} CPUs, server on {args.threads} "
          "torch threads; times in ms")
    print(f"{'server':>14} {'conc':>4} {'req/s':>6} {'out tok/s':>9} {'out len':>7} {'TTFT p50':>8} {'p99':>7} "
          f"{'TPOT p50':>8} {'p99':>7} {'ITL p50':>7} {'p99':>7}")
    for (label, c), r in rows.items():
        print(f"{label:>14} {c:>4} {r['req_s']:6.2f} {r['tok_s']:9.1f} {r['out_len']:7.1f} {r['ttft50'] * 1e3:8.1f} "
              f"{r['ttft99'] * 1e3:7.1f} {r['tpot50'] * 1e3:8.1f} {r['tpot99'] * 1e3:7.1f} {r['itl50'] * 1e3:7.1f} "
              f"{r['itl99'] * 1e3:7.1f}")
    top, low = max(levels), min(levels)
    if ("batched", top) in rows and ("one-at-a-time", top) in rows:
        speedup = rows["batched", top]["tok_s"] / rows["one-at-a-time", top]["tok_s"]
        ratio = rows["batched", top]["ttft50"] / rows["batched", low]["ttft50"]
        print(f"\noutput-token throughput at concurrency {top}, batched / one at a time: {speedup:.2f}x (goal >= 4x)")
        print(f"batched TTFT p50 at concurrency {top} / at {low}: {ratio:.2f}x (goal < 2x)")


# ---------------------------------------------------------------------------------------- --upstreams N

def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux's /proc; NaN elsewhere)."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def added_ttft(ways: list[tuple[str, str]], pairs: int) -> list[list[float]]:
    """TTFTs of ``pairs`` requests to each (url, key) of ``ways``, taking turns, at concurrency 1."""
    times = [[] for _ in ways]
    async with httpx.AsyncClient(timeout=60) as client:
        for i in range(pairs):
            for way, (url, secret) in enumerate(ways):
                client.headers["authorization"] = f"Bearer {secret}"
                times[way].append((await one_request(client, url, PROMPTS[i % len(PROMPTS)], 2, i)).ttft)
    return times


def bench_gateway(args, levels: list[int]) -> None:
    n, rows = args.upstreams, {}
    worker_threads = max(1, args.threads // n)
    workers, servers = [], {}
    with tempfile.TemporaryDirectory() as workdir:
        try:
            for _ in range(n):
                workers.append(Process("worker", "--model", args.model, "--served-model-name", "bench",
                                       "--threads", str(worker_threads), "--max-batch-size", str(args.batch_size),
                                       *args.server_args.split()))
            upstreams = [a for w in workers for a in ("--upstream", w.url)]
            servers[f"gateway/{n}"] = Process("serve", *upstreams, "--db", f"sqlite:///{workdir}/gateway.db",
                                              expect_key=True)
            servers["serve"] = Process("serve", "--model", args.model, "--served-model-name", "bench", "--db",
                                       f"sqlite:///{workdir}/serve.db", "--threads", str(args.threads),
                                       "--max-batch-size", str(args.batch_size), *args.server_args.split(),
                                       expect_key=True)
            for label, server in servers.items():
                asyncio.run(run_level(server.url, server.key, 1, 2, 8, float("inf")))  # warm-up
                for c in levels:
                    count = max(c * args.prompts_per_client, args.min_requests)
                    results, wall = asyncio.run(run_level(server.url, server.key, c, count, args.max_tokens,
                                                          args.request_rate))
                    rows[label, c] = r = summarize(results, wall)
                    print(f"{label:>10} c={c:<3} {r['tok_s']:8.1f} tok/s  TTFT p50 {r['ttft50'] * 1000:7.1f} ms",
                          file=sys.stderr, flush=True)
            # The added TTFT, with the workers, the gateway and an `openglm serve` like one worker up
            servers.pop("serve").stop()
            servers["serve/1"] = alone = Process(
                "serve", "--model", args.model, "--served-model-name", "bench", "--db", f"sqlite:///{workdir}/one.db",
                "--threads", str(worker_threads), "--max-batch-size", str(args.batch_size), *args.server_args.split(),
                expect_key=True)
            gateway = servers[f"gateway/{n}"]
            cpu, cpu_alone = cpu_seconds(gateway.proc.pid), cpu_seconds(alone.proc.pid)
            direct, through, embedded = asyncio.run(added_ttft(
                [(workers[0].url, "none"), (gateway.url, gateway.key), (alone.url, alone.key)], args.ttft_pairs))
            cpu = (cpu_seconds(gateway.proc.pid) - cpu) / args.ttft_pairs
            cpu_alone = (cpu_seconds(alone.proc.pid) - cpu_alone) / args.ttft_pairs  # its HTTP process
        finally:
            for process in [*servers.values(), *workers]:
                process.stop()

    print(f"\nmodel {args.model}, {args.max_tokens} max tokens, {os.cpu_count()} CPUs; gateway over {n} workers "
          f"of {worker_threads} torch threads each, serve on {args.threads}; max batch {args.batch_size}; times in ms")
    print(f"{'server':>10} {'conc':>4} {'req/s':>6} {'out tok/s':>9} {'TTFT p50':>8} {'p99':>7} {'TPOT p50':>8}")
    for (label, c), r in rows.items():
        print(f"{label:>10} {c:>4} {r['req_s']:6.2f} {r['tok_s']:9.1f} {r['ttft50'] * 1e3:8.1f} {r['ttft99'] * 1e3:7.1f} "
              f"{r['tpot50'] * 1e3:8.1f}")
    for c in levels:
        ratio = rows[f"gateway/{n}", c]["tok_s"] / rows["serve", c]["tok_s"]
        print(f"output tokens/s at concurrency {c}, gateway over {n} workers / one serve: {ratio:.2f}x")
    added = [b - a for a, b in zip(direct, through)]
    hop = [b - a for a, b in zip(embedded, through)]
    print(f"TTFT p50 over {len(direct)} requests each, concurrency 1, 2 tokens: straight to a worker "
          f"{pct(direct, 50) * 1e3:.2f} ms, through the gateway {pct(through, 50) * 1e3:.2f} ms, one `openglm serve` "
          f"like a worker {pct(embedded, 50) * 1e3:.2f} ms")
    print(f"added by the gateway (paired differences): over the worker p50 {pct(added, 50) * 1e3:.2f} ms "
          f"(p90 {pct(added, 90) * 1e3:.2f}; goal < 1 ms), of which billing is what `openglm serve` does too; "
          f"over `openglm serve` (the hop alone) p50 {pct(hop, 50) * 1e3:.2f} ms (p90 {pct(hop, 90) * 1e3:.2f})")
    print(f"CPU time per request (2 tokens streamed): the gateway {cpu * 1e3:.2f} ms (key, reservation, forwarding, "
          f"settlement), `openglm serve`'s HTTP process {cpu_alone * 1e3:.2f} ms (the same but forwarding)")


if __name__ == "__main__":
    main()
