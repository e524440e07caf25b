"""Time the small kernel calls of a RecurrentGemma-2B decoding step, one token at a time.

Per call, best of 5 passes: the RG-LRU gate projection (10 blocks of 256 x 256 bfloat16
weights, read from memory), the RG-LRU scan at T = 1 with and without the softplus of
its parameter given, and RMS normalization of one 2560-wide row in NumPy and in C.

    python tools/time_decode_parts.py [--threads N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import timeit

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rgref import kernels, layers             # noqa: E402
from rgref.dtypes import float32_to_bfloat16  # noqa: E402

WIDTH, HEADS = 2560, 10
# Copies of the gate weights that together far exceed the last-level cache, so each call
# reads its weights from memory.
GATE_COPIES_BYTES = 512 * 2**20


def time_gate_projection(rng) -> float:
    """Return the seconds of one block-diagonal call at N = 1 on weights from memory."""
    block = WIDTH // HEADS
    weights = float32_to_bfloat16(
        rng.standard_normal((HEADS, block, block), dtype=np.float32) * 0.02)
    copies = [weights.copy() for _ in range(GATE_COPIES_BYTES // weights.nbytes)]
    x = rng.standard_normal((1, WIDTH), dtype=np.float32)
    bias = rng.standard_normal(WIDTH, dtype=np.float32)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for copy in copies:
            kernels.block_diagonal_linear(x, copy, bias)
        best = min(best, (time.perf_counter() - start) / len(copies))
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=0,
                        help="threads for the C kernels (default: the OpenMP default)")
    args = parser.parse_args(argv)
    if not kernels.available():
        sys.exit(f"error: {kernels.unavailable_reason()}")
    kernels.set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 1, WIDTH), dtype=np.float32)
    a_param = rng.standard_normal(WIDTH, dtype=np.float32)
    softplus_a = kernels.softplus(a_param)
    scale = rng.standard_normal(WIDTH, dtype=np.float32)
    position, h = np.array([[5]], np.int32), np.zeros((1, WIDTH), np.float32)
    calls = {
        "RG-LRU scan, T = 1": lambda: kernels.rg_lru_scan(x, x, x, a_param, position, h),
        "the same with softplus_a given": lambda: kernels.rg_lru_scan(
            x, x, x, a_param, position, h, softplus_a=softplus_a),
        "layers.rms_norm, one row": lambda: layers.rms_norm(x, scale),
        "kernels.rms_norm, one row": lambda: kernels.rms_norm(x, scale, 1e-6),
    }
    print(f"{kernels.get_num_threads()} threads, microseconds per call")
    print(f"RG-LRU gate projection, N = 1, weights from memory: "
          f"{time_gate_projection(rng) * 1e6:.0f}")
    for name, call in calls.items():
        seconds = min(timeit.repeat(call, number=1000, repeat=5)) / 1000
        print(f"{name}: {seconds * 1e6:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
