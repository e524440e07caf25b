"""Time the prompt (matrix-matrix) path of the C kernels with and without AVX-512.

The linear layers of RecurrentGemma-2B at N prompt tokens, on random bfloat16 weights,
and with --model a whole prefill of N tokens, each timed with the AVX-512 code allowed
and forbidden in turn (`kernels.set_avx512`), best of --repeats calls. Both codes give
the same bits, so only the time differs.

    python tools/time_prompt.py
    python tools/time_prompt.py --tokens 64 --model bench-cache/recurrentgemma-2b-bfloat16-huggingface
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rgref                               # noqa: E402
from rgref import kernels                  # noqa: E402
from rgref.dtypes import float32_to_bfloat16  # noqa: E402

# (M, K) of the 2B model's dense layers: the MLP up and gate, the MLP down, the
# recurrent and attention projections, and a tenth of the logits layer.
SHAPES = [(7680, 2560), (2560, 7680), (2560, 2560), (25600, 2560)]


def best_of_each(calls: dict, repeats: int) -> dict:
    """Call each function `repeats` times, taking turns, and return the best time of each."""
    best = {name: float("inf") for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def with_avx512(allowed: bool, function):
    def call():
        kernels.set_avx512(allowed)
        try:
            function()
        finally:
            kernels.set_avx512(True)
    return call


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64, help="prompt tokens N (default: 64)")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads for the C kernels (default: the OpenMP default)")
    parser.add_argument("--repeats", type=int, default=15,
                        help="calls of each code, best taken (default: 15)")
    parser.add_argument("--model", help="also time a whole prefill of this checkpoint")
    args = parser.parse_args(argv)

    if not kernels.available():
        sys.exit(f"error: {kernels.unavailable_reason()}")
    if not kernels.uses_avx512():
        sys.exit("error: this CPU has no AVX-512F/DQ, so there is no AVX-512 code to compare")
    kernels.set_num_threads(args.threads)
    print(f"{args.tokens} tokens, {kernels.get_num_threads()} threads, best of {args.repeats}")
    rng = np.random.default_rng(0)
    print("linear M x K      AVX-512 GFLOP/s   AVX2 GFLOP/s")
    for m, k in SHAPES:
        x = rng.standard_normal((args.tokens, k), dtype=np.float32)
        w = float32_to_bfloat16(rng.standard_normal((m, k), dtype=np.float32))
        best = best_of_each({code: with_avx512(code == "avx512", lambda: kernels.linear(x, w))
                             for code in ("avx512", "avx2")}, args.repeats)
        flop = 2 * args.tokens * m * k
        print(f"{m:>6} x {k:<6} {flop / best['avx512'] / 1e9:16.0f} "
              f"{flop / best['avx2'] / 1e9:14.0f}")

    if args.model:
        model = rgref.load(args.model)
        model.num_threads = args.threads or None
        tokens = rng.integers(0, model.config.vocab_size, (1, args.tokens))
        model.forward(tokens)  # maps in the weights
        repeats = max(1, args.repeats // 5)
        best = best_of_each({code: with_avx512(code == "avx512", lambda: model.forward(tokens))
                             for code in ("avx512", "avx2")}, repeats)
        print(f"prefill of {args.tokens} tokens, logits of every position, best of {repeats}: "
              f"AVX-512 {args.tokens / best['avx512']:.1f} tok/s, "
              f"AVX2 {args.tokens / best['avx2']:.1f} tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
