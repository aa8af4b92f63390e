"""Decode and prefill speed of openglm versus transformers on the same random GLM-4 weights.

    python bench/decode.py [--config glm-4-100m] [--new-tokens 128] [--prompt 512] [--repeats 3]

Both run fp32 on the CPU with the same thread count. The two are measured alternately, repeats
times, and the median of each is reported, so a busy machine slows both alike.
"""

from __future__ import annotations

import argparse
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
from openglm.infer.generate import generate_steps  # noqa: E402


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="glm-4-100m")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=512, help="prompt length for the prefill measurement")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    eos = 0
    config = Config.from_name(args.config, eos_token_id=[eos], pad_token_id=eos)
    ours = GLMForCausalLM.from_config(config, seed=0).eval()
    with torch.no_grad():  # end-of-text logit 0, never the largest: both sides generate every token
        ours.lm_head.weight[eos] = 0
    with tempfile.TemporaryDirectory() as tmp:
        save_model(ours, Path(tmp) / "m")
        hf = AutoModelForCausalLM.from_pretrained(Path(tmp) / "m").eval()
    tok = word_tokenizer(config.vocab_size)
    n = args.new_tokens
    short = torch.randint(0, config.vocab_size, (1, 16))
    long = torch.randint(0, config.vocab_size, (1, args.prompt))
    greedy = SamplingParams(max_new_tokens=n, temperature=0)

    def ours_decode():
        steps = sum(1 for _ in generate_steps(ours, tok, [short[0].tolist()], greedy))
        assert steps == n

    def hf_decode():
        out = hf.generate(short, attention_mask=torch.ones_like(short), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        assert out.shape[1] == short.shape[1] + n

    def ours_prefill():
        ours(long, cache=ours.new_cache(1, args.prompt + 1), logits_to_keep=1)

    def hf_prefill():
        hf(long, use_cache=True, logits_to_keep=1)

    # Prefill is measured apart from decode: generate() times include one short prefill.
    with torch.inference_mode():
        ours_decode(), hf_decode(), ours_prefill(), hf_prefill()  # warm-up
        times = {k: [] for k in ("ours_decode", "hf_decode", "ours_prefill", "hf_prefill")}
        for _ in range(args.repeats):
            for name, fn in (("ours_decode", ours_decode), ("hf_decode", hf_decode),
                             ("ours_prefill", ours_prefill), ("hf_prefill", hf_prefill)):
                times[name] += timed(fn, 1)
    med = {k: statistics.median(v) for k, v in times.items()}
    dec_o, dec_h = n / med["ours_decode"], n / med["hf_decode"]
    pre_o, pre_h = args.prompt / med["ours_prefill"], args.prompt / med["hf_prefill"]
    weights = sum(p.numel() * p.element_size() for p in ours.parameters()) - ours.model.embed_tokens.weight.nbytes

    print(f"config {args.config}: {config.num_parameters / 1e6:.1f}M parameters, fp32, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print("| measurement | openglm | transformers | ratio |")
    print("|---|---|---|---|")
    print(f"| greedy decode, batch 1, {n} new tokens (tokens/s) | {dec_o:.1f} | {dec_h:.1f} | {dec_o / dec_h:.2f}x |")
    print(f"| prefill, {args.prompt}-token prompt (tokens/s) | {pre_o:.0f} | {pre_h:.0f} | {pre_o / pre_h:.2f}x |")
    print(f"weights read per decoded token: {weights / 2**20:.0f} MiB -> openglm decode moves "
          f"{weights * dec_o / 1e9:.1f} GB/s of weights")


if __name__ == "__main__":
    main()
