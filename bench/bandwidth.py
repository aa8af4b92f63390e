"""Memory read bandwidth of this machine: the bound on bandwidth-limited decoding.

    python bench/bandwidth.py [--mib 512] [--repeats 7]

Decoding one token reads every weight once, so tokens/s <= bandwidth / bytes of weights per token.
The figure is the median speed of summing a tensor far larger than the caches (each float read
once, one add per float: memory-bound on any CPU with SIMD), using torch's current thread count.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def measure_bandwidth(mib: int = 512, repeats: int = 7) -> float:
    """Bytes per second read from memory: the median over ``repeats`` sums of a ``mib`` MiB fp32 tensor."""
    data = torch.ones(mib * 2**20 // 4)
    data.sum()  # touch every page once before timing
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return data.nbytes / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=512, help="size of the tensor read (well above the caches)")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    bw = measure_bandwidth(args.mib, args.repeats)
    print(f"memory read bandwidth: {bw / 1e9:.1f} GB/s ({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
