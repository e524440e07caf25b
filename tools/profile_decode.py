"""Show where a decoding step spends its time, kernel by kernel.

Loads a checkpoint, feeds a prompt, then times single-token forward calls on the
chosen backend while every function of `rgref.kernels` and `rgref.layers` that the
model calls is wrapped in a timer. Prints milliseconds per step for each function,
the rest (Python, NumPy glue), and the rate at which the step reads the weights.

Use it with the synthetic 2B checkpoints that tools/bench.py writes, on a quiet
machine, to see how far decoding is from the memory bandwidth limit and why:

  python tools/profile_decode.py bench-cache/recurrentgemma-2b-bfloat16-huggingface
  python tools/profile_decode.py CHECKPOINT --bandwidth 49.5    # GB/s, from bench.py
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rgref                               # noqa: E402
from rgref import kernels, layers          # noqa: E402

GB = 1e9
# The C path calls kernels.rms_norm and the NumPy path layers.rms_norm: both count as
# "rms_norm".
TIMED_KERNELS = ("linear", "block_diagonal_linear", "rg_lru_scan", "local_attention",
                 "gelu_tanh", "soft_cap", "conv1d", "rms_norm")
TIMED_LAYERS = ("rms_norm", "apply_rope")


def add_timers(module, names, seconds: dict, calls: collections.Counter) -> None:
    """Replace module.<name> by a wrapper that adds its run time to seconds[name]."""
    for name in names:
        function = getattr(module, name, None)
        if function is None:
            continue

        @functools.wraps(function)
        def timed(*args, _function=function, _name=name, **kwargs):
            start = time.perf_counter()
            result = _function(*args, **kwargs)
            seconds[_name] += time.perf_counter() - start
            calls[_name] += 1
            return result

        setattr(module, name, timed)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="checkpoint directory or weights file")
    parser.add_argument("--backend", choices=("c", "numpy"), default="c",
                        help="backend to profile (default: c)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="threads for the C kernels (default: the number of cores)")
    parser.add_argument("--prompt-tokens", type=int, default=64,
                        help="prompt length before the timed steps (default: 64)")
    parser.add_argument("--steps", type=int, default=16,
                        help="timed decoding steps (default: 16)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps before them (default: 3)")
    parser.add_argument("--bandwidth", type=float, metavar="GB_PER_S",
                        help="memory read bandwidth to compare the step with, in GB/s")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.prompt_tokens < 1 or args.warmup < 0:
        parser.error("--steps and --prompt-tokens must be at least 1, --warmup at least 0")

    model = rgref.load(args.model)
    model.backend = args.backend
    model.num_threads = args.threads
    weight_bytes = sum(value.nbytes for value in model.params.values())
    seconds: dict = collections.defaultdict(float)
    calls: collections.Counter = collections.Counter()
    add_timers(kernels, TIMED_KERNELS, seconds, calls)
    add_timers(layers, TIMED_LAYERS, seconds, calls)

    prompt = np.random.default_rng(1).integers(3, model.config.vocab_size,
                                               (1, args.prompt_tokens))
    logits, cache = model.forward(prompt, logits="last")
    token = logits[:, -1].argmax(-1)
    for _ in range(args.warmup):
        logits, cache = model.forward(token[:, None], cache=cache)
        token = logits[:, -1].argmax(-1)
    seconds.clear()
    calls.clear()
    start = time.perf_counter()
    for _ in range(args.steps):
        logits, cache = model.forward(token[:, None], cache=cache)
        token = logits[:, -1].argmax(-1)
    step = (time.perf_counter() - start) / args.steps

    print(f"{args.backend} backend, {args.threads} threads, {args.steps} steps after a "
          f"{args.prompt_tokens}-token prompt and {args.warmup} warm-up steps")
    print(f"{'function':<24} {'ms/step':>8} {'calls/step':>10}")
    accounted = 0.0
    for name, total in sorted(seconds.items(), key=lambda item: -item[1]):
        accounted += total / args.steps
        print(f"{name:<24} {total / args.steps * 1e3:8.2f} {calls[name] // args.steps:10d}")
    print(f"{'rest (Python, NumPy)':<24} {(step - accounted) * 1e3:8.2f}")
    print(f"{'step':<24} {step * 1e3:8.2f}")
    rate = weight_bytes / step / GB
    line = f"weights read per step: {weight_bytes / GB:.2f} GB, {rate:.1f} GB/s"
    if "linear" in seconds:
        line += f"; in `linear` alone {seconds['linear'] / args.steps * 1e3:.1f} ms"
    if args.bandwidth:
        line += f"; {rate / args.bandwidth:.2f} of {args.bandwidth:g} GB/s"
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
