"""Training speed of openglm's pretraining step versus a plain ``transformers`` step, and the MFU.

    python bench/train.py [--config glm-tiny] [--batch-size 8] [--seq-len 512] [--steps 3] [--rounds 3]
                          [--threads N] [--compile]

A step is forward + backward + AdamW on one batch, fp32 on the CPU. Three steps are timed:

- ``hf causal``: ``Glm4ForCausalLM`` loaded by ``transformers`` from our saved weights, causal LM
  loss on every position (``labels=input_ids``), ``torch.optim.AdamW``;
- ``ours causal``: our step (``PretrainLoss`` + fused AdamW) on the same rows, the same loss;
- ``ours GLM``: our step on rows of the real pretraining stream (blank infilling, GLM-10B mixture,
  greedy packing, the dense ``[B, T, T]`` packed mask) over random documents.

They run alternately, ``rounds`` times, and the median step time of each is reported, so a busy
machine slows all alike. MFU = model FLOPs per second over the measured fp32 matmul peak, with model
FLOPs = 6 x (non-embedding parameters x tokens) + attention 12 x layers x T x heads x head_dim x
tokens, counting the output layer only at positions that have a target.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from openglm import Config, GLMForCausalLM, save_model  # noqa: E402
from openglm.data.objective import IGNORE_INDEX, SpecialIds  # noqa: E402
from openglm.train.data import PackedBatches  # noqa: E402
from openglm.train.run import PretrainLoss, build_optimizer  # noqa: E402
from openglm.train.parallel import decoder_layers  # noqa: E402


class RandomDocuments:
    """Stand-in for ``TokenShards``: documents of random tokens, lengths log-normal around 300."""

    directory = "random documents"

    def __init__(self, vocab_size: int, num_documents: int = 2000, seed: int = 0):
        rng = np.random.default_rng(seed)
        lengths = rng.lognormal(np.log(300), 1.0, num_documents).astype(int).clip(8, 4000)
        self.docs = [rng.integers(16, vocab_size, n, dtype=np.uint32) for n in lengths]
        self.num_documents = num_documents

    def iter_documents(self, seed: int, start: int = 0):
        order = np.random.default_rng(seed).permutation(self.num_documents)
        return (self.docs[i] for i in order[start:])


def matmul_peak(n: int = 4096, repeats: int = 3) -> float:
    """fp32 FLOP/s of one large ``torch.mm`` (best of ``repeats``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(_time(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * n**3 / best


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def model_flops(config: Config, tokens: int, targets: int, seq_len: int) -> float:
    """Forward + backward FLOPs of one step (see the module docstring)."""
    body = config.num_parameters - 2 * config.vocab_size * config.hidden_size  # layers and final norm
    head = config.vocab_size * config.hidden_size
    attention = 12 * config.num_layers * seq_len * config.num_heads * config.head_dim
    return 6 * (body * tokens + head * targets) + attention * tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="glm-tiny")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--compile", action="store_true", help="torch.compile our decoder layers (as --compile does)")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B, T = args.batch_size, args.seq_len
    config = Config.from_name(args.config)
    lm = GLMForCausalLM.from_config(config, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        save_model(lm, Path(tmp) / "m")
        hf = AutoModelForCausalLM.from_pretrained(Path(tmp) / "m", attn_implementation="sdpa", dtype=torch.float32)
    ours = PretrainLoss(lm).train()
    if args.compile:
        for layer in decoder_layers(ours):
            layer.compile()
    hf.train()
    lr, betas, wd = 1e-4, (0.9, 0.95), 0.1
    ours_opt = build_optimizer(ours, lr, wd, torch.device("cpu"))
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=lr, betas=betas, weight_decay=wd)

    ids = torch.randint(16, config.vocab_size, (B, T))
    causal_targets = torch.cat([ids[:, 1:], torch.full((B, 1), IGNORE_INDEX)], dim=1)
    positions = torch.arange(T).expand(B, T)
    special = SpecialIds(mask=1, smask=2, gmask=3, sop=4, eop=5, eos=0, pad=0)
    stream = PackedBatches(RandomDocuments(config.vocab_size), T, special, seed=0, sentence_end_ids=[10, 11])
    glm, glm_targets = stream.next_batch(B)
    glm_inputs = (glm["input_ids"], glm["position_ids"] if config.position_encoding_2d else glm["position_ids_1d"],
                  glm["attention_mask"], glm["targets"])

    with torch.no_grad():  # the same weights compute the same loss
        a = ours(ids, positions, None, causal_targets).item() / (B * (T - 1))
        b = hf(input_ids=ids, labels=ids).loss.item()
    print(f"causal loss at init: ours {a:.6f}, transformers {b:.6f}")

    def ours_step(inputs):
        def step():
            loss = ours(*inputs)
            loss.backward()
            ours_opt.step()
            ours_opt.zero_grad(set_to_none=True)
        return step

    def hf_step():
        hf(input_ids=ids, labels=ids).loss.backward()
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)

    steps = {"hf causal": hf_step, "ours causal": ours_step((ids, positions, None, causal_targets)),
             "ours GLM": ours_step(glm_inputs)}
    for fn in steps.values():  # warm up (and compile)
        fn()
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, fn in steps.items():
            times[name].extend(_time(fn) for _ in range(args.steps))
    peak = matmul_peak()

    tokens = B * T
    targets = {"hf causal": B * (T - 1), "ours causal": B * (T - 1), "ours GLM": glm_targets}
    print(f"{args.config}: {config.num_parameters / 1e6:.1f}M parameters, batch {B} x {T}, {args.threads} threads, "
          f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s" + (", compiled" if args.compile else ""))
    rate = {}
    for name in steps:
        t = statistics.median(times[name])
        rate[name] = tokens / t
        mfu = model_flops(config, tokens, targets[name], T) / t / peak
        print(f"  {name:<12} {t * 1000:8.0f} ms/step  {rate[name]:8,.0f} tokens/s  MFU {mfu:5.1%}  "
              f"(targets {targets[name] / tokens:.0%} of positions)")
    print(f"ours causal / hf causal: {rate['ours causal'] / rate['hf causal']:.2f}x; "
          f"ours GLM / hf causal: {rate['ours GLM'] / rate['hf causal']:.2f}x")


if __name__ == "__main__":
    main()
