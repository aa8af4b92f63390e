"""Speed of the serving engine's step, in process: no HTTP, no detokenization, the engine core alone.

    python bench/engine_step.py [--model glm-tiny] [--batch 1,16] [--new-tokens 128] [--prompt 16]
                                [--repeats 3] [--threads 1] [--profile 20]

For each batch size B, B greedy requests of ``--prompt`` random tokens are submitted to a running
``EngineCore`` at once; once every one of them has its first token (their prompts are in the cache),
the decode steps that follow are timed up to the last token: steps/s and output tokens/s of the whole
batch. Generation never stops early (the model's end-of-text ids are taken out of its config here), so
every timed step decodes all B rows. The table also gives the median time from submitting a request to
its first token (in process: queueing, prefill and the first sample, no HTTP), and the engine thread's
CPU time per step (``time.thread_time``), which time spent waiting for a busy machine's cores does not
inflate as it does the wall-clock figures. Batch sizes are measured in turn, ``--repeats`` rounds, and the
median of each is reported. ``--profile N`` then runs one more round per batch size under cProfile
(on the engine thread, decode steps only) and prints its N costliest functions by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import os
import pstats
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from openglm import SamplingParams, load_model  # noqa: E402
from openglm.data.tokenizer import Tokenizer as GLMTokenizer  # noqa: E402
from openglm.serve.engine.core import EngineCore  # noqa: E402
from openglm.serve.engine.request import EngineRequest  # noqa: E402


def run(model, tokenizer, batch: int, prompt: int, new_tokens: int, profiler: cProfile.Profile | None = None):
    """(decode steps/s, output tokens/s, median ms to a first token, CPU ms per step) of one batch of ``batch`` requests, timed as the module says."""
    done = threading.Event()
    state = {"first": {}, "start": None, "steps0": 0, "tokens": 0, "ended": 0}
    engine: EngineCore

    def on_outputs(outputs):  # on the engine thread
        now = time.perf_counter()
        for out in outputs:
            if state["start"] is not None and out.token is not None:
                state["tokens"] += 1
            state["first"].setdefault(out.request_id, now)
            state["ended"] += out.finish_reason is not None
        if state["start"] is None and len(state["first"]) == batch:
            state["start"], state["steps0"], state["cpu0"] = now, engine.steps, time.thread_time()
            if profiler is not None:
                profiler.enable()  # profiles the calling thread: the engine's
        if state["ended"] == batch:
            if profiler is not None:
                profiler.disable()
            state["end"], state["steps1"], state["cpu1"] = now, engine.steps, time.thread_time()
            done.set()

    engine = EngineCore(model, tokenizer, on_outputs, max_batch_size=max(batch, 1))
    engine.start()
    generator = torch.Generator().manual_seed(batch)
    submitted = time.perf_counter()
    try:
        for _ in range(batch):
            ids = torch.randint(0, model.config.vocab_size, (prompt,), generator=generator).tolist()
            engine.add(EngineRequest(ids, SamplingParams(max_new_tokens=new_tokens, temperature=0)))
        if not done.wait(600):
            raise SystemExit("the engine did not finish within 600 s")
    finally:
        engine.stop()
    seconds = state["end"] - state["start"]
    # The step that ends the requests is counted by engine.steps only after its outputs are handed out.
    steps = state["steps1"] - state["steps0"] + 1
    ttft = statistics.median(t - submitted for t in state["first"].values()) * 1000
    return steps / seconds, state["tokens"] / seconds, ttft, (state["cpu1"] - state["cpu0"]) * 1000 / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="glm-tiny", help="a checkpoint directory or bundled name")
    parser.add_argument("--batch", default="1,16", help="comma-separated batch sizes")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens per request")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per request")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also profile one round per batch size and print its N costliest functions")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model).eval()
    # No end-of-text: every request runs to --new-tokens, so each timed step decodes the whole batch.
    model.config = dataclasses.replace(model.config, eos_token_id=[])
    tokenizer = GLMTokenizer(Tokenizer(models.WordLevel({f"t{i}": i for i in range(model.config.vocab_size)},
                                                        unk_token="t0")))
    batches = [int(b) for b in args.batch.split(",")]
    run(model, tokenizer, max(batches), args.prompt, 8)  # warm-up: first-call allocations and kernel loading
    results: dict[int, list[tuple[float, float, float, float]]] = {b: [] for b in batches}
    for _ in range(args.repeats):
        for b in batches:
            results[b].append(run(model, tokenizer, b, args.prompt, args.new_tokens))
    print(f"# {args.model}, {args.threads} thread(s), prompt {args.prompt}, {args.new_tokens} new tokens, "
          f"median of {args.repeats}; load {os.getloadavg()[0]:.2f}")
    print("| batch | steps/s | output tok/s | ms/step | CPU ms/step | ms to first token |")
    print("|---|---|---|---|---|---|")
    for b in batches:
        steps = statistics.median(r[0] for r in results[b])
        tokens = statistics.median(r[1] for r in results[b])
        ttft = statistics.median(r[2] for r in results[b])
        cpu = statistics.median(r[3] for r in results[b])
        print(f"| {b} | {steps:.1f} | {tokens:.1f} | {1000 / steps:.2f} | {cpu:.2f} | {ttft:.1f} |")
    for b in batches if args.profile else ():
        profiler = cProfile.Profile()
        run(model, tokenizer, b, args.prompt, args.new_tokens, profiler)
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.profile)
        print(f"\n## profile, batch {b} (decode steps only, own time)\n{out.getvalue()}")


if __name__ == "__main__":
    main()
