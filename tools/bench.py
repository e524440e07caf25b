"""Measure rgref's speed and memory at RecurrentGemma-2B sizes, beside other implementations.

Every figure comes from one run on one machine, so the comparisons are ratios
taken at the same time. The weights are synthetic (real 2B names, shapes and
bfloat16 dtype, random values; see tools/make_synthetic_checkpoint.py), written
once to bench-cache/ and reused.

What it measures, each in a fresh subprocess whose peak resident memory
(VmHWM, which counts the memory-mapped weight pages it touched) is recorded:

  bandwidth  the machine's memory read bandwidth: NumPy float32 GEMV over a
             1 GiB matrix, best of several, at the start and (with the rgref
             part) right before and after the C path's batch-1 decode.
             Decoding reads every weight once per step, so this bounds its
             speed.
  kernels    the RG-LRU at T=2048, E=2560 (C kernel vs NumPy `layers.rg_lru`)
             and a bfloat16 GEMV 7680x2560 (GB/s of weights read)
  rgref      the C and NumPy paths: prefill of a 512-token prompt with logits
             for every position, decode tokens/s at batch 1 and 8, load time,
             time to first token after a 64-token prompt
  reference  the official `recurrentgemma` PyTorch model and Hugging Face
             transformers, float32 and bfloat16, on the same weights with a
             64-token prompt (needs --ref-python with torch; skipped otherwise)
  cli        `python -m rgref.generate --max-new-tokens 16` on the Hugging Face
             and Kaggle layouts, and a float32 checkpoint narrowed at load

Every rgref measurement imports a copy of the package (compiled kernels
included) taken when the run starts, so rebuilding the kernels meanwhile does
not change or crash it. All systems use --threads threads. An OpenMP kernel
waits for its slowest thread, so on a machine where other jobs hold a core,
--threads 1 gives steadier figures.

Examples:
  python tools/bench.py                                  # everything rgref alone can run
  python tools/bench.py --ref-python /path/to/venv/bin/python --write docs/BENCHMARKS.md
  python tools/bench.py --only kernels,bandwidth --quick
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TOOLS = os.path.join(ROOT, "tools")
PARTS = ("bandwidth", "kernels", "rgref", "reference", "cli")
PRESET = "recurrentgemma-2b"
RESULT_PREFIX = "BENCH-RESULT "
# Bytes of weight copies a GEMV measurement cycles through: more than the largest
# last-level caches (AMD's 3D V-Cache parts have 96 MB per chiplet).
GEMV_WORKING_SET = 512 * 2**20
GB = 1e9    # sizes are reported in GB of 10^9 bytes, the unit of the targets
# The prompt of the side-by-side runs and of the time-to-first-token figure.
SHORT_PROMPT = 64
CLI_PROMPT = ("The Griffin architecture mixes gated linear recurrences with local attention, "
              "so its state stays small however long the text grows.")
# Targets: (key, description, threshold); a ratio at or above the threshold passes.
TARGETS = (
    ("decode_fraction", "C path bf16 decode (batch 1) reaches >= 80% of the measured "
                        "memory bandwidth limit", 0.80),
    ("decode_vs_hf", "C path bf16 decode >= 1.5x transformers' bf16 decode", 1.5),
    ("prefill_vs_hf", "C path prefill (64 tokens) >= transformers' float32 prefill", 1.0),
    ("rss_c", "C path peak RSS (bf16 weights) <= 6 GB", 1.0),
    ("rss_numpy", "NumPy path peak RSS (bf16 weights) <= 12 GB", 1.0),
    ("scan_speedup", "RG-LRU layer at T=2048 (gate projections, gates, decay, scan): C >= 50x "
     "faster than NumPy", 50.0),
)


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


# =============================================================================
# Workers: each runs in its own subprocess and prints one result line
# =============================================================================

def best_time(function, repeats: int) -> float:
    """Return the fastest of `repeats` timed calls of `function`, after one warm-up call."""
    function()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def gemv_seconds(function, vector: np.ndarray, weight: np.ndarray, repeats: int) -> float:
    """Return the time of one `function(vector, w)` with w read from memory, not the cache.

    A matrix of tens of MB fits in the last-level cache of many server CPUs, and
    timing it over and over would measure that cache. So each timed pass calls
    `function` once on each of several copies of `weight` that together exceed
    GEMV_WORKING_SET bytes, and the best pass is divided by the number of copies.
    """
    copies = [weight.copy() for _ in range(max(2, -(-GEMV_WORKING_SET // weight.nbytes)))]

    def one_pass():
        for w in copies:
            function(vector, w)

    return best_time(one_pass, repeats) / len(copies)


def worker_bandwidth(spec: dict) -> dict:
    """NumPy float32 GEMV over a matrix of `bytes` bytes: every element read once per call."""
    columns = 4096
    rows = spec["bytes"] // (4 * columns)
    matrix = np.ones((rows, columns), np.float32)          # written, so every page is resident
    vector = np.ones(columns, np.float32)
    seconds = best_time(lambda: matrix @ vector, spec["repeats"])
    return {"bytes": matrix.nbytes, "seconds": seconds, "gb_per_s": matrix.nbytes / seconds / GB}


def worker_kernels(spec: dict) -> dict:
    """Time the RG-LRU (C vs NumPy) and the bfloat16 GEMV kernel."""
    from rgref import kernels, layers
    from rgref.dtypes import float32_to_bfloat16

    kernels.set_num_threads(spec["threads"])
    rng = np.random.default_rng(0)
    B, T, E, H = 1, spec["scan_steps"], 2560, 10
    x = rng.standard_normal((B, T, E), dtype=np.float32)
    gate_weights = [(rng.standard_normal((H, E // H, E // H), dtype=np.float32) * 0.02,
                     rng.standard_normal((H, E // H), dtype=np.float32) * 0.02)
                    for _ in range(2)]
    a_param = rng.standard_normal(E, dtype=np.float32)
    segment_pos = np.arange(T)[None]
    (wx, bx), (wa, ba) = gate_weights

    def numpy_rg_lru():
        layers.rg_lru(x, segment_pos, a_param, wx, bx, wa, ba)

    def numpy_projections():
        return (layers.block_diagonal_linear(x, wx, bx), layers.block_diagonal_linear(x, wa, ba))

    def c_projections():
        return (kernels.block_diagonal_linear(x, wx, bx), kernels.block_diagonal_linear(x, wa, ba))

    # The C path of the model runs the two projections, then the fused scan kernel.
    gate_x_pre, gate_a_pre = c_projections()
    segment_pos32 = segment_pos.astype(np.int32)

    def c_scan():
        kernels.rg_lru_scan(x, gate_x_pre, gate_a_pre, a_param, segment_pos32,
                            np.zeros((B, E), np.float32))

    a = rng.uniform(0.5, 1.0, (B, T, E)).astype(np.float32)
    repeats = spec["repeats"]
    result = {
        "scan_steps": T,
        "numpy_rg_lru_s": best_time(numpy_rg_lru, repeats),
        "numpy_projections_s": best_time(numpy_projections, repeats),
        "numpy_linear_scan_s": best_time(lambda: layers.linear_scan(x, a, None), repeats),
        "c_projections_s": best_time(c_projections, 5 * repeats),
        "c_scan_s": best_time(c_scan, 5 * repeats),
    }

    M, K = 7680, 2560
    weight_f32 = rng.standard_normal((M, K), dtype=np.float32) * 0.02
    weight_bf16 = float32_to_bfloat16(weight_f32)
    vector = rng.standard_normal((1, K), dtype=np.float32)
    repeats = 5 * spec["repeats"]
    result["gemv_bf16_s"] = gemv_seconds(kernels.linear, vector, weight_bf16, repeats)
    result["gemv_f32_s"] = gemv_seconds(kernels.linear, vector, weight_f32, repeats)
    result["gemv_numpy_f32_s"] = gemv_seconds(lambda x, w: x @ w.T, vector, weight_f32, repeats)
    result["gemv_bf16_gb_per_s"] = weight_bf16.nbytes / result["gemv_bf16_s"] / GB
    result["gemv_f32_gb_per_s"] = weight_f32.nbytes / result["gemv_f32_s"] / GB
    result["gemv_numpy_f32_gb_per_s"] = weight_f32.nbytes / result["gemv_numpy_f32_s"] / GB
    return result


def prompt_tokens(batch: int, length: int, vocab_size: int) -> np.ndarray:
    """Return the same pseudo-random prompt for every system: ids in [3, vocab_size)."""
    return np.random.default_rng(1).integers(3, vocab_size, (batch, length))


def decode_loop(step, first_ids, steps: int, warmup: int) -> tuple[float, list]:
    """Feed greedy tokens one step at a time; return seconds for `steps` steps after `warmup`."""
    ids = first_ids
    for _ in range(warmup):
        ids = step(ids)
    start = time.perf_counter()
    for _ in range(steps):
        ids = step(ids)
    return time.perf_counter() - start, ids


def worker_rgref(spec: dict) -> dict:
    """Load a checkpoint and time prefill or decoding on one backend."""
    import rgref

    start = time.perf_counter()
    model = rgref.load(spec["model"], weights_dtype=spec.get("weights_dtype"))
    load_seconds = time.perf_counter() - start
    model.backend = spec["backend"]
    model.num_threads = spec["threads"]
    result = {"load_s": load_seconds, "backend": model.resolve_backend(),
              "weight_bytes": sum(v.nbytes for v in model.params.values())}
    batch, length = spec["batch"], spec["prompt_tokens"]
    tokens = prompt_tokens(batch, length, model.config.vocab_size)

    # The first call also maps in the weights and starts the threads, so it gives the time
    # to first token. The prefill speed comes from a second call with the same prompt.
    start = time.perf_counter()
    logits, cache = model.forward(tokens, logits=spec.get("logits", "all"))
    logits[:, -1].argmax(-1)
    first_token_s = time.perf_counter() - start
    del logits, cache
    start = time.perf_counter()
    logits, cache = model.forward(tokens, logits=spec.get("logits", "all"))
    prefill_seconds = time.perf_counter() - start
    ids = logits[:, -1].argmax(-1)
    result.update(prefill_tokens=batch * length, prefill_s=prefill_seconds,
                  prefill_tok_per_s=batch * length / prefill_seconds,
                  first_token_s=first_token_s)
    if spec["decode_steps"]:
        def step(ids):
            logits, _ = model.forward(ids[:, None], cache=cache)
            return logits[:, -1].argmax(-1)

        seconds, _ = decode_loop(step, ids, spec["decode_steps"], spec["warmup"])
        result.update(decode_steps=spec["decode_steps"], decode_s=seconds,
                      decode_tok_per_s=batch * spec["decode_steps"] / seconds,
                      step_s=seconds / spec["decode_steps"])
    return result


def _torch_dtype(name: str):
    import torch
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def worker_official(spec: dict) -> dict:
    """Time the official recurrentgemma PyTorch model on the Kaggle-layout .pt file."""
    import torch
    import recurrentgemma.torch as official

    torch.set_num_threads(spec["threads"])
    dtype = _torch_dtype(spec["dtype"])
    start = time.perf_counter()
    # Converting tensor by tensor keeps two copies of one tensor in memory, not
    # of the whole model. The model is built on the meta device (no
    # initialisation) and adopts the converted tensors.
    params = torch.load(spec["model"], weights_only=True)
    for name in list(params):
        params[name] = params[name].to(dtype)
    # The hyperparameters the tensor shapes do not show, from the benchmarked config.
    config = official.GriffinConfig.from_torch_params(
        params, embeddings_scale_by_sqrt_dim=spec["embeddings_scale_by_sqrt_dim"],
        attention_window_size=spec["attention_window"], logits_soft_cap=spec["logits_soft_cap"])
    with torch.device("meta"):
        model = official.Griffin(config, gradient_checkpointing=False, dtype=dtype)
    model.load_state_dict(params, assign=True)
    del params
    model.eval()
    load_seconds = time.perf_counter() - start

    length = spec["prompt_tokens"]
    tokens = torch.from_numpy(prompt_tokens(1, length, config.vocab_size))
    result = {"load_s": load_seconds, "version": _package_version("recurrentgemma"),
              "torch_version": torch.__version__}
    with torch.inference_mode():
        # As for rgref: the first call gives the time to first token, a second the speed.
        start = time.perf_counter()
        logits, cache = model(tokens, torch.arange(length)[None], return_cache=True)
        logits[:, -1].argmax(-1)
        first_token_s = time.perf_counter() - start
        del logits, cache
        start = time.perf_counter()
        logits, cache = model(tokens, torch.arange(length)[None], return_cache=True)
        prefill_seconds = time.perf_counter() - start
        ids = logits[:, -1].argmax(-1)
        result.update(prefill_tokens=length, prefill_s=prefill_seconds,
                      prefill_tok_per_s=length / prefill_seconds,
                      first_token_s=first_token_s)
        position = [length]

        def step(ids):
            nonlocal cache
            segment_pos = torch.tensor([[position[0]]])
            logits, cache = model(ids[:, None], segment_pos, cache=cache, return_cache=True)
            position[0] += 1
            return logits[:, -1].argmax(-1)

        seconds, _ = decode_loop(step, ids, spec["decode_steps"], spec["warmup"])
    result.update(decode_steps=spec["decode_steps"], decode_s=seconds,
                  decode_tok_per_s=spec["decode_steps"] / seconds,
                  step_s=seconds / spec["decode_steps"])
    return result


def worker_transformers(spec: dict) -> dict:
    """Time transformers' RecurrentGemmaForCausalLM on the Hugging Face directory."""
    import torch
    import transformers
    from transformers import DynamicCache, RecurrentGemmaForCausalLM

    torch.set_num_threads(spec["threads"])
    start = time.perf_counter()
    model = RecurrentGemmaForCausalLM.from_pretrained(spec["model"],
                                                      dtype=_torch_dtype(spec["dtype"]))
    model.eval()
    load_seconds = time.perf_counter() - start

    length = spec["prompt_tokens"]
    tokens = torch.from_numpy(prompt_tokens(1, length, model.config.vocab_size))
    result = {"load_s": load_seconds, "version": transformers.__version__,
              "torch_version": torch.__version__}
    with torch.inference_mode():
        # The recurrent blocks keep their state in the modules. The attention
        # keys and values go into the cache object passed to every call. As for rgref,
        # the first call gives the time to first token and a second one the speed.
        def prefill():
            cache = DynamicCache(config=model.config)
            logits = model(input_ids=tokens, position_ids=torch.arange(length)[None],
                           cache=cache, use_cache=True).logits
            return logits, cache

        start = time.perf_counter()
        logits, cache = prefill()
        logits[:, -1].argmax(-1)
        first_token_s = time.perf_counter() - start
        del logits, cache
        start = time.perf_counter()
        logits, cache = prefill()
        prefill_seconds = time.perf_counter() - start
        ids = logits[:, -1].argmax(-1)
        result.update(prefill_tokens=length, prefill_s=prefill_seconds,
                      prefill_tok_per_s=length / prefill_seconds,
                      first_token_s=first_token_s)
        position = [length]

        def step(ids):
            logits = model(input_ids=ids[:, None], position_ids=torch.tensor([[position[0]]]),
                           cache=cache, use_cache=True).logits
            position[0] += 1
            return logits[:, -1].argmax(-1)

        seconds, _ = decode_loop(step, ids, spec["decode_steps"], spec["warmup"])
    result.update(decode_steps=spec["decode_steps"], decode_s=seconds,
                  decode_tok_per_s=spec["decode_steps"] / seconds,
                  step_s=seconds / spec["decode_steps"])
    return result


def worker_cli(spec: dict) -> dict:
    """Run `python -m rgref.generate ARGV` in this process, as `-m` would, and return its status.

    Running it here lets the worker report the command's peak memory (VmHWM);
    its stdout and stderr are the command's own.
    """
    import runpy

    sys.argv = ["rgref.generate", *spec["argv"]]
    try:
        runpy.run_module("rgref.generate", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        return {"exit_status": e.code}
    return {"exit_status": 0}


def worker_probe(spec: dict) -> dict:
    """Report which reference packages this interpreter can import, and their versions."""
    found = {"python": platform.python_version(), "numpy": np.__version__}
    for package in ("torch", "recurrentgemma", "transformers"):
        try:
            __import__(package)
        except Exception as e:      # an import can fail in many ways (ABI, missing JAX)
            found[package] = None
            found[package + "_error"] = f"{type(e).__name__}: {e}"[:200]
        else:
            found[package] = _package_version(package)
    return found


def _package_version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(package)
    except PackageNotFoundError:
        return getattr(sys.modules.get(package), "__version__", None)


WORKERS = {"bandwidth": worker_bandwidth, "kernels": worker_kernels, "rgref": worker_rgref,
           "official": worker_official, "transformers": worker_transformers,
           "cli": worker_cli, "probe": worker_probe}


# =============================================================================
# Running subprocesses and recording their peak memory
# =============================================================================

def child_environment(threads: int, extra_path: str | None = None) -> dict:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(threads)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [extra_path, env.get("PYTHONPATH")]))
    return env


def peak_rss_bytes() -> int | None:
    """Return this process's peak resident set size (VmHWM), or None where /proc is missing.

    VmHWM belongs to the current program image: unlike a child's ru_maxrss, it
    does not include the parent's memory that the child held between fork and
    exec. It counts anonymous memory and the file pages mapped in, so weights
    read through a memory map count once touched.
    """
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            match = re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def run_as_worker(spec_json: str) -> int:
    spec = json.loads(spec_json)
    if spec.get("rgref_path"):
        sys.path.insert(0, spec["rgref_path"])     # the run's copy of the package
    result = WORKERS[spec["kind"]](spec)
    result["peak_rss_bytes"] = peak_rss_bytes()
    print("\n" + RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


def run_worker(python: str, spec: dict, args, extra_path: str | None = None) -> dict:
    """Run one worker in a fresh interpreter; return its result, or {"error": ...}.

    A worker still running after --timeout seconds is killed. The result
    contains the worker's stderr under "stderr" when spec["keep_stderr"] is set.
    """
    spec = dict(spec, threads=args.threads, rgref_path=args.rgref_path)
    label = spec.get("label", spec["kind"])
    if "model" in spec:
        warm_page_cache(spec["model"])
    elif "argv" in spec:
        warm_page_cache(spec["argv"][spec["argv"].index("--model") + 1])
    log(f"measuring {label} ...")
    command = [python, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    try:
        run = subprocess.run(command, capture_output=True, text=True, errors="replace",
                             env=child_environment(args.threads, extra_path), cwd=ROOT,
                             timeout=args.timeout)
    except FileNotFoundError:
        log(f"{label}: interpreter {python} not found")
        return {"label": label, "error": "failed", "message": f"{python} not found"}
    except subprocess.TimeoutExpired:
        log(f"{label}: unfinished after {args.timeout:.0f} s")
        return {"label": label, "error": f"unfinished after {args.timeout:.0f} s"}
    lines = [line for line in run.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if run.returncode != 0 or not lines:
        tail = run.stderr.strip().splitlines()[-3:] or ["no output"]
        log(f"{label}: failed (exit status {run.returncode}): {' | '.join(tail)}")
        return {"label": label, "error": "failed", "message": tail[-1]}
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    result["label"] = label
    if spec.get("keep_stderr"):
        result["stderr"] = run.stderr
    log(f"{label}: {summarize(result)}")
    return result


def summarize(result: dict) -> str:
    keys = ("gb_per_s", "prefill_tok_per_s", "decode_tok_per_s", "load_s", "c_scan_s",
            "gemv_bf16_gb_per_s")
    parts = [f"{k} {result[k]:.3g}" for k in keys if isinstance(result.get(k), float)]
    if result.get("peak_rss_bytes"):
        parts.append(f"peak RSS {result['peak_rss_bytes'] / GB:.2f} GB")
    return ", ".join(parts)


# =============================================================================
# Measurements
# =============================================================================

def ensure_checkpoints(args) -> dict:
    """Write the synthetic checkpoints this run needs (once); return their paths."""
    sys.path.insert(0, TOOLS)
    import make_synthetic_checkpoint as synthetic

    config = synthetic.synthetic_config(PRESET, args.shrink, args.num_blocks)
    name = PRESET if (args.shrink, args.num_blocks) == (1, None) else (
        f"{PRESET}-shrink{args.shrink}-{config.num_blocks}blocks")
    needed = [("huggingface", "bfloat16")]
    if "reference" in args.parts or "cli" in args.parts:
        needed.append(("kaggle", "bfloat16"))
    if "cli" in args.parts:
        needed.append(("huggingface", "float32"))
    paths = {"weight_bytes": 2 * sum(int(np.prod(shape)) for shape in
                                     synthetic.names.expected_shapes(config).values()),
             "hyperparameters": dict(
                 embeddings_scale_by_sqrt_dim=config.embeddings_scale_by_sqrt_dim,
                 attention_window=config.attention_window,
                 logits_soft_cap=config.logits_soft_cap)}
    for layout, dtype in needed:
        directory = synthetic.default_directory(args.cache, name, dtype, layout)
        if synthetic.write_checkpoint(directory, config, layout, dtype, name=name):
            log(f"wrote {directory}")
        paths[layout, dtype] = directory
        if layout == "kaggle":
            paths["kaggle_file"] = os.path.join(directory, synthetic.torch_file_name(name))
    return paths


def measure_bandwidth(args) -> dict:
    """Run the bandwidth worker: NumPy float32 GEMV over args.bandwidth_bytes."""
    return run_worker(sys.executable, dict(kind="bandwidth", bytes=args.bandwidth_bytes,
                                           repeats=args.repeats), args)


def measure_rgref(args, model_dir: str, bandwidth_around_decode: dict) -> dict:
    """Measure the C and NumPy paths: prefill (long prompt), decode at batch 1 and batch 8.

    With the bandwidth part, the memory bandwidth is also measured right before and right
    after the C path's batch-1 decode, because a target compares that run with it. The
    bandwidth of a VM can change by a third within minutes. Those two measurements go
    into `bandwidth_around_decode` as "before" and "after".
    """
    results = {}
    for backend in ("c", "numpy"):
        length = args.prompt_tokens if backend == "c" else args.numpy_prompt_tokens
        runs = {
            "prefill": dict(batch=1, prompt_tokens=length, decode_steps=0),
            "prefill_last": dict(batch=1, prompt_tokens=length, decode_steps=0, logits="last"),
            "decode1": dict(batch=1, prompt_tokens=SHORT_PROMPT, decode_steps=args.decode_steps),
            "decode8": dict(batch=8, prompt_tokens=args.batch_prompt_tokens,
                            decode_steps=args.decode_steps),
        }
        for mode, run in runs.items():
            spec = dict(run, kind="rgref", label=f"rgref {backend} {mode}", model=model_dir,
                        backend=backend, warmup=args.warmup)
            around_decode = "bandwidth" in args.parts and (backend, mode) == ("c", "decode1")
            if around_decode:
                bandwidth_around_decode["before"] = measure_bandwidth(args)
            results[backend, mode] = run_worker(sys.executable, spec, args)
            if around_decode:
                bandwidth_around_decode["after"] = measure_bandwidth(args)
    return results


def measure_reference(args, paths: dict, probe: dict) -> dict:
    """Measure the official PyTorch model and transformers in float32 and bfloat16."""
    results = {}
    systems = []
    if probe.get("recurrentgemma") and probe.get("torch"):
        systems.append(("official", paths["kaggle_file"]))
    if probe.get("transformers") and probe.get("torch"):
        systems.append(("transformers", paths["huggingface", "bfloat16"]))
    for system, model in systems:
        for dtype in ("float32", "bfloat16"):
            spec = dict(kind=system, label=f"{system} {dtype}", model=model, dtype=dtype,
                        prompt_tokens=SHORT_PROMPT, decode_steps=args.decode_steps,
                        warmup=args.warmup, **paths["hyperparameters"])
            results[system, dtype] = run_worker(args.ref_python, spec, args,
                                                args.transformers_path)
    return results


CLI_PATTERNS = {
    "load_s": r"loaded .* in ([\d.]+) s",
    "prompt_tokens": r"prompt (\d+) tokens",
    "prefill_tok_per_s": r"prompt \d+ tokens in [\d.]+ s \(([\d.]+) tok/s\)",
    "generated": r"generated (\d+) tokens",
    "decode_tok_per_s": r"generated \d+ tokens in [\d.]+ s \(([\d.]+) tok/s\)",
    "first_token_s": r"time to first token ([\d.]+) s",
}


def measure_cli(args, paths: dict) -> list[dict]:
    """Run `python -m rgref.generate` as a user does and record its output and peak RSS."""
    cases = [
        ("Hugging Face bf16, C path", paths["huggingface", "bfloat16"], []),
        ("Kaggle 2b.pt bf16, C path", paths["kaggle", "bfloat16"], []),
        ("Hugging Face bf16, NumPy path", paths["huggingface", "bfloat16"],
         ["--backend", "numpy"]),
        ("Hugging Face float32 narrowed at load, C path", paths["huggingface", "float32"],
         ["--dtype", "bfloat16"]),
    ]
    rows = []
    for (label, model, extra), stored_bf16 in zip(cases, (True, True, True, False)):
        argv = ["--model", model, "--max-new-tokens", str(args.cli_tokens), "--temperature", "0",
                "--threads", str(args.threads), *extra, CLI_PROMPT]
        row = run_worker(sys.executable, dict(kind="cli", label=f"CLI {label}", argv=argv,
                                              keep_stderr=True), args)
        row.update(label=label, stored_bf16=stored_bf16,
                   backend="numpy" if "numpy" in extra else "c")
        row["command"] = display_command([sys.executable, "-m", "rgref.generate", *argv])
        if "error" not in row and row["exit_status"] != 0:
            row.update(error="failed", message=row["stderr"].strip().splitlines()[-1])
        for key, pattern in CLI_PATTERNS.items():
            match = re.search(pattern, row.get("stderr", ""))
            if match:
                row[key] = float(match.group(1))
        row.pop("stderr", None)
        rows.append(row)
    return rows


def display_command(command: list[str]) -> str:
    """Show a command with the repository and interpreter paths shortened."""
    shown = ["python" if i == 0 else os.path.relpath(part, ROOT) if part.startswith(ROOT)
             else part for i, part in enumerate(command)]
    return shlex.join(shown)


# =============================================================================
# The machine
# =============================================================================

def machine_info() -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "kernel": platform.release(), "python": platform.python_version(),
            "numpy": np.__version__}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpuinfo = f.read()
        model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
        flags = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M)
        family = re.search(r"^cpu family\s*:\s*(\d+)$", cpuinfo, re.M)
        number = re.search(r"^model\s*:\s*(\d+)$", cpuinfo, re.M)
        if model:
            # A VM's model name may be just "AMD EPYC"; family and model tell the generation.
            info["cpu"] = model.group(1).strip() + (
                f" (family {family.group(1)}, model {number.group(1)})" if family and number else "")
        if flags:
            present = set(flags.group(1).split())
            info["flags"] = {flag: flag in present for flag in ("avx2", "fma", "f16c", "avx512f")}
        with open("/proc/meminfo", encoding="utf-8") as f:
            total_kib = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1))
        info["ram_bytes"] = total_kib * 1024
    except (OSError, AttributeError):
        pass        # not Linux: the page shows what platform reports
    try:
        from rgref import kernels
        info["kernels"] = (f"built, OpenMP {'on' if kernels.has_openmp() else 'off'}, "
                           f"AVX2 code {'used' if kernels.uses_avx2() else 'not used'}, "
                           f"AVX-512 prompt code "
                           f"{'used' if kernels.uses_avx512() else 'not used'}"
                           if kernels.available() else kernels.unavailable_reason())
    except ImportError as e:
        info["kernels"] = f"not importable: {e}"
    import rgref
    info["rgref"] = rgref.__version__
    return info


def snapshot_package() -> str:
    """Copy the rgref package, compiled kernels included, to a new temporary directory.

    Every rgref measurement imports this copy. Rebuilding the extension in the
    source tree during a run would otherwise mix two builds in one report, and
    overwriting a shared library that a running process has mapped kills that
    process with SIGBUS.
    """
    directory = tempfile.mkdtemp(prefix="rgref-bench-")
    shutil.copytree(os.path.join(ROOT, "rgref"), os.path.join(directory, "rgref"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    return directory


def kernel_library_fingerprint(package_parent: str = ROOT) -> str:
    """Return the compiled kernels' file name, size and modification time ("" if none)."""
    import glob
    found = sorted(glob.glob(os.path.join(package_parent, "rgref", "_kernels.*")))
    if not found:
        return ""
    stat = os.stat(found[0])
    modified = datetime.datetime.fromtimestamp(stat.st_mtime, datetime.timezone.utc)
    return f"{os.path.basename(found[0])}, {stat.st_size} bytes, built {modified:%H:%M:%S} UTC"


def warm_page_cache(path: str) -> None:
    """Read every file under `path` once, so each load starts from the page cache, not disk."""
    files = [path] if os.path.isfile(path) else [
        os.path.join(path, name) for name in sorted(os.listdir(path))]
    for name in files:
        with open(name, "rb") as f:
            while f.read(64 * 2**20):
                pass


def load_average() -> str:
    try:
        with open("/proc/loadavg", encoding="utf-8") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


# =============================================================================
# Targets and the report
# =============================================================================

def ratio(numerator, denominator):
    if numerator is None or denominator in (None, 0):
        return None
    return numerator / denominator


def field(results: dict, key, name: str):
    """Return results[key][name], or None when that measurement failed or did not run."""
    value = results.get(key) or {}
    return value.get(name) if "error" not in value else None


def decode_bandwidth_limit(report: dict) -> tuple[float | None, str]:
    """Return the memory bandwidth (GB/s) that bounds the C path's batch-1 decode, and
    which measurement it comes from."""
    measured = report.get("bandwidth_around_decode") or {}
    around = {key: field(measured, key, "gb_per_s") for key in ("before", "after")}
    around = {key: value for key, value in around.items() if value}
    if len(around) == 2:
        return max(around.values()), "the higher of the bandwidths measured right before and after"
    if around:
        (key, value), = around.items()
        return value, f"measured right {key}; the other measurement failed"
    return (report.get("bandwidth") or {}).get("gb_per_s"), "measured at the start of the run"


def evaluate_targets(report: dict) -> list[tuple[str, float | None, float, str]]:
    """Return (description, measured ratio, threshold, detail) for each target."""
    rg, ref = report.get("rgref", {}), report.get("reference", {})
    decode = rg.get(("c", "decode1"), {})
    measured, details = {}, {}

    # Decode reads every weight once per step, so bytes / step time is its bandwidth. The
    # limit is the higher of the bandwidths measured right before and after that run, or
    # the one measured at the start when those are missing.
    bandwidth, source = decode_bandwidth_limit(report)
    if decode.get("step_s") and bandwidth:
        achieved = decode["weight_bytes"] / decode["step_s"] / GB
        measured["decode_fraction"] = achieved / bandwidth
        details["decode_fraction"] = (f"{decode['weight_bytes'] / GB:.2f} GB per step in "
                                      f"{decode['step_s']:.3f} s = {achieved:.1f} GB/s of "
                                      f"{bandwidth:.1f} GB/s ({source})")

    hf_bf16 = field(ref, ("transformers", "bfloat16"), "decode_tok_per_s")
    measured["decode_vs_hf"] = ratio(decode.get("decode_tok_per_s"), hf_bf16)
    if measured["decode_vs_hf"] is not None:
        details["decode_vs_hf"] = f"{decode['decode_tok_per_s']:.2f} vs {hf_bf16:.2f} tok/s"

    hf_f32 = field(ref, ("transformers", "float32"), "prefill_tok_per_s")
    measured["prefill_vs_hf"] = ratio(decode.get("prefill_tok_per_s"), hf_f32)
    if measured["prefill_vs_hf"] is not None:
        details["prefill_vs_hf"] = f"{decode['prefill_tok_per_s']:.1f} vs {hf_f32:.1f} tok/s"

    for backend, limit, key in (("c", 6.0, "rss_c"), ("numpy", 12.0, "rss_numpy")):
        # Every generating run of this path on the bfloat16 checkpoint: the workers and
        # the CLI. Generation computes the logits of the last prompt position only, so
        # the long prefill with the logits of every position (0.5 GB of them for 512
        # tokens at 2B) is shown in its own column but not counted here.
        runs = [r for (b, mode), r in rg.items() if b == backend and mode != "prefill"]
        cli_runs = [r for r in report.get("cli", [])
                    if r["backend"] == backend and r["stored_bf16"]]
        peaks = [r["peak_rss_bytes"] / GB for r in runs + cli_runs if r.get("peak_rss_bytes")]
        if peaks:
            # The ratio is limit / peak, so that >= 1 passes like the other targets.
            measured[key] = limit / max(peaks)
            kinds = "decode, prefill with the last logits" + (", command line" if cli_runs else "")
            details[key] = (f"max {max(peaks):.2f} GB over {len(peaks)} generating runs "
                            f"({kinds})")
            prefill_all = (rg.get((backend, "prefill")) or {}).get("peak_rss_bytes")
            if prefill_all:
                details[key] += (f"; prefill with the logits of every position: "
                                 f"{prefill_all / GB:.2f} GB")

    kernels = report.get("kernels") or {}
    if kernels.get("c_scan_s"):
        c_rg_lru = kernels["c_scan_s"] + kernels["c_projections_s"]
        measured["scan_speedup"] = kernels["numpy_rg_lru_s"] / c_rg_lru
        details["scan_speedup"] = (f"NumPy `layers.rg_lru` {kernels['numpy_rg_lru_s'] * 1e3:.0f}"
                                   f" ms vs C {c_rg_lru * 1e3:.1f} ms, both including the gate "
                                   "projections")
    return [(description, measured.get(key), threshold, details.get(key, "not measured"))
            for key, description, threshold in TARGETS]


def fmt(value, digits: int = 3, suffix: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}{suffix}"
    return f"{value}{suffix}"


def rss(result: dict | None) -> str:
    if not result or not result.get("peak_rss_bytes"):
        return "n/a"
    return f"{result['peak_rss_bytes'] / GB:.2f} GB"


def cell(result: dict | None, name: str, digits: int = 3, suffix: str = "") -> str:
    """Format one figure of a measurement for a table, or why it is missing."""
    if not result:
        return "not run"
    if "error" in result:
        return result["error"]
    return fmt(result.get(name), digits, suffix)


def render_header(report: dict) -> list[str]:
    machine, probe = report["machine"], report.get("probe") or {}
    if report.get("shrunk"):
        introduction = (
            "rgref on a shrunk RecurrentGemma-2B, measured by `tools/bench.py` to test the "
            f"tool: the synthetic weights take {report['weight_gb']:.2f} GB. Its figures are "
            "not those of the 2B model, and the targets are not evaluated.")
    else:
        introduction = (
            "rgref at RecurrentGemma-2B sizes on a CPU, measured by `tools/bench.py`. The "
            "weights are synthetic: the real names, shapes and bfloat16 dtype of "
            f"recurrentgemma-2b ({report['weight_gb']:.2f} GB) with random values "
            "(`tools/make_synthetic_checkpoint.py`). Speed and memory are those of the real "
            "model, but the generated text is noise.")
    lines = [
        "# Benchmarks", "",
        introduction + " Every comparison below is a ratio of figures measured in this one "
        "run. Each measurement runs in a fresh process, and its "
        "peak RSS is the process's VmHWM, which counts the memory-mapped weight pages it "
        "touched.", "",
        "## Machine and run", "",
        f"- Date: {report['date']}",
        f"- Command: `{report['command']}`",
        f"- CPU: {machine.get('cpu')}, {machine.get('cores')} cores; RAM "
        f"{machine.get('ram_bytes', 0) / GB:.1f} GB; Linux {machine.get('kernel')}",
        "- CPU flags: " + ", ".join(f"{k.upper()} {'yes' if v else 'no'}"
                                    for k, v in machine.get("flags", {}).items()),
        f"- Threads: {report['threads']} for every system (OpenMP, OpenBLAS, torch)",
        f"- Load average (1, 5, 15 min) before: {report['load_before']}; after: "
        f"{report['load_after']}",
        f"- rgref {machine.get('rgref')}, Python {machine.get('python')}, NumPy "
        f"{machine.get('numpy')}; C kernels: {machine.get('kernels')} "
        f"({report['kernels_measured']})",
        "- Every rgref measurement imports a copy of the `rgref` package taken at the start of "
        "the run, so the figures come from one build.",
        "- Checkpoint files are read once before each measurement, so load times are "
        "from the page cache, not from disk.",
    ]
    if probe:
        lines.append(f"- Reference interpreter: Python {probe.get('python')}, torch "
                     f"{probe.get('torch')}, recurrentgemma {probe.get('recurrentgemma')}, "
                     f"transformers {probe.get('transformers')}, NumPy {probe.get('numpy')}")
    lines += [f"- {note}" for note in report.get("notes", [])]
    return lines


def render_targets(report: dict) -> list[str]:
    lines = ["## Targets", "", "| target | measured | result | detail |", "|---|---|---|---|"]
    for description, value, threshold, detail in evaluate_targets(report):
        if value is None:
            shown, verdict = "n/a", "not measured"
        elif report.get("shrunk"):
            shown, verdict = f"{value:.2f}", "not evaluated (shrunk model)"
        else:
            shown = f"{value:.2f} (need >= {threshold:g})"
            verdict = "PASS" if value >= threshold else "FAIL"
        lines.append(f"| {description} | {shown} | {verdict} | {detail} |")
    lines += ["", "The two memory targets are shown as limit / peak, so >= 1 passes. "
              "[PERFORMANCE.md](PERFORMANCE.md) shows where the time of a decoding step "
              "and of the RG-LRU goes, and what bounds the targets that fail."]
    return lines


def render_rgref(report: dict) -> list[str]:
    rg = report["rgref"]
    c_prompt = (rg.get(("c", "prefill")) or {}).get("prefill_tokens")
    numpy_prompt = (rg.get(("numpy", "prefill")) or {}).get("prefill_tokens")
    lines = [
        "## rgref on the shrunk model, bfloat16 weights" if report.get("shrunk")
        else "## rgref at 2B, bfloat16 weights", "",
        f"Prefill: one prompt of {fmt(c_prompt)} tokens (C) and {fmt(numpy_prompt)} tokens "
        "(NumPy), with the logits of every position, and again with those of the last "
        "position only (`forward(..., logits=\"last\")`, what generation computes). Each "
        "prefill is timed on a second call with the same prompt, after a first call that "
        "also maps in the weights. Decode: greedy, one token per call after a "
        f"{SHORT_PROMPT}-token prompt (batch 1) or a {report['batch_prompt_tokens']}-token "
        f"prompt per row (batch 8), {report['decode_steps']} timed steps after "
        f"{report['warmup']} warm-up steps. Batch 8 counts 8 tokens per step. Time to first "
        f"token: the {SHORT_PROMPT}-token prompt's forward pass plus picking the token. It is "
        "the first call after loading, so it includes mapping in the weights.", "",
        "| path | prefill tok/s, all / last logits | decode tok/s, batch 1 | "
        "decode tok/s, batch 8 | time to first token | load | "
        "peak RSS prefill all / last, decode 1 / 8 |",
        "|---|---|---|---|---|---|---|",
    ]
    for backend, name in (("c", "C"), ("numpy", "NumPy")):
        prefill, prefill_last, decode1, decode8 = (
            rg.get((backend, mode)) for mode in ("prefill", "prefill_last", "decode1", "decode8"))
        lines.append(
            f"| {name} | {cell(prefill, 'prefill_tok_per_s')} / "
            f"{cell(prefill_last, 'prefill_tok_per_s')} | "
            f"{cell(decode1, 'decode_tok_per_s')} | {cell(decode8, 'decode_tok_per_s')} | "
            f"{cell(decode1, 'first_token_s', suffix=' s')} | "
            f"{cell(decode1, 'load_s', suffix=' s')} | "
            f"{rss(prefill)} / {rss(prefill_last)}, {rss(decode1)} / {rss(decode8)} |")
    return lines


def render_side_by_side(report: dict) -> list[str]:
    rg, ref = report.get("rgref") or {}, report.get("reference") or {}
    probe = report.get("probe") or {}
    lines = [
        f"## Side by side: {SHORT_PROMPT}-token prompt, same weights", "",
        "Prefill computes logits for every position and is timed on a second call with the "
        "same prompt. Time to first token is the first call after loading, and decode is "
        "greedy at batch 1. The "
        "official model reads the Kaggle-layout `2b.pt`: `torch.load`, each tensor converted "
        "to the run's dtype, then adopted by a model built on the meta device. transformers "
        "reads the Hugging Face directory with `from_pretrained(dtype=...)`. rgref keeps the "
        "stored bfloat16 weights and computes in float32.", "",
        "| system | weights | prefill tok/s | decode tok/s | time to first token | load | "
        "peak RSS |", "|---|---|---|---|---|---|---|",
    ]
    rows = [("rgref C path", "bfloat16", rg.get(("c", "decode1"))),
            ("rgref NumPy path", "bfloat16", rg.get(("numpy", "decode1")))]
    names = {"official": f"official recurrentgemma {probe.get('recurrentgemma')} (PyTorch)",
             "transformers": f"transformers {probe.get('transformers')}"}
    for (system, dtype), result in ref.items():
        rows.append((names[system], dtype, result))
    for name, dtype, result in rows:
        lines.append(f"| {name} | {dtype} | {cell(result, 'prefill_tok_per_s')} | "
                     f"{cell(result, 'decode_tok_per_s')} | "
                     f"{cell(result, 'first_token_s', suffix=' s')} | "
                     f"{cell(result, 'load_s', suffix=' s')} | {rss(result)} |")
    if not ref:
        lines += ["", "The official model and transformers were not measured: "
                  + report.get("reference_skipped", "not requested") + "."]
    return lines


def render_kernels(report: dict) -> list[str]:
    lines = ["## Kernels and memory bandwidth", "", "| measurement | time | rate |",
             "|---|---|---|"]
    bandwidth, kernels = report.get("bandwidth") or {}, report.get("kernels") or {}
    around = report.get("bandwidth_around_decode") or {}
    runs = [("at the start of the run", bandwidth),
            ("right before the C path's batch-1 decode", around.get("before")),
            ("right after it", around.get("after"))]
    for when, result in runs:
        if result and "gb_per_s" in result:
            lines.append(f"| NumPy float32 GEMV over {result['bytes'] / 2**30:.2g} GiB (memory "
                         f"read bandwidth, best of {report['repeats']}), {when} | "
                         f"{result['seconds'] * 1e3:.1f} ms | {result['gb_per_s']:.1f} GB/s |")
    if "c_scan_s" not in kernels:
        return lines
    rows = [
        (f"RG-LRU, T={kernels['scan_steps']}, E=2560, H=10: NumPy `layers.rg_lru`",
         kernels["numpy_rg_lru_s"], None),
        ("its two block-diagonal gate projections, NumPy `layers.block_diagonal_linear`",
         kernels["numpy_projections_s"], None),
        ("its time loop, NumPy `layers.linear_scan`", kernels["numpy_linear_scan_s"], None),
        ("the two projections, C `kernels.block_diagonal_linear`", kernels["c_projections_s"],
         None),
        ("gates, decay and scan fused, C `kernels.rg_lru_scan`", kernels["c_scan_s"], None),
        ("bfloat16 GEMV 7680x2560, C `kernels.linear`", kernels["gemv_bf16_s"],
         kernels["gemv_bf16_gb_per_s"]),
        ("float32 GEMV 7680x2560, C `kernels.linear`", kernels["gemv_f32_s"],
         kernels["gemv_f32_gb_per_s"]),
        ("float32 GEMV 7680x2560, NumPy", kernels["gemv_numpy_f32_s"],
         kernels["gemv_numpy_f32_gb_per_s"]),
    ]
    for name, seconds, rate in rows:
        shown_rate = "" if rate is None else f"{rate:.1f} GB/s of weights"
        lines.append(f"| {name} | {seconds * 1e3:.2f} ms | {shown_rate} |")
    lines += ["", f"Each GEMV call reads its weights from memory: a timed pass calls it once "
              f"on each of several copies of the matrix, {GEMV_WORKING_SET // 2**20} MiB in "
              "all, and the best pass is divided by the number of copies."]
    numpy_after_projections = kernels["numpy_rg_lru_s"] - kernels["numpy_projections_s"]
    lines += ["", "Everything after the projections: NumPy "
              f"{numpy_after_projections * 1e3:.1f} ms (rg_lru minus its projections) vs C "
              f"{kernels['c_scan_s'] * 1e3:.2f} ms, "
              f"{numpy_after_projections / kernels['c_scan_s']:.2g}x. The NumPy time loop "
              "alone vs the C kernel, which also computes the gates and the decay: "
              f"{kernels['numpy_linear_scan_s'] / kernels['c_scan_s']:.2g}x."]
    return lines


def render_cli(report: dict) -> list[str]:
    cli = report["cli"]
    lines = [
        "## Command line", "",
        f"`python -m rgref.generate --max-new-tokens {report['cli_tokens']} --temperature 0` "
        "with the prompt below. Speeds and times are the ones the command prints on stderr, "
        "and peak RSS is the process's VmHWM.", "",
        f"Prompt: \"{CLI_PROMPT}\"", "",
        "| checkpoint and path | load | prompt tok/s | decode tok/s | time to first token | "
        "peak RSS |", "|---|---|---|---|---|---|",
    ]
    for row in cli:
        lines.append(f"| {row['label']} | {cell(row, 'load_s', suffix=' s')} | "
                     f"{cell(row, 'prefill_tok_per_s')} | {cell(row, 'decode_tok_per_s')} | "
                     f"{cell(row, 'first_token_s', suffix=' s')} | {rss(row)} |")
    lines += ["", "Commands:", ""]
    lines += [f"    {row['command']}" for row in cli]
    return lines


def all_results(report: dict) -> list[dict]:
    results = [report.get("bandwidth"), report.get("kernels"), *report.get("cli", [])]
    for part in ("rgref", "reference"):
        results += list((report.get(part) or {}).values())
    return [r for r in results if r]


def render(report: dict) -> str:
    """Return the Markdown page for a report."""
    sections = [render_header(report), render_targets(report)]
    if report.get("rgref"):
        sections.append(render_rgref(report))
    if report.get("rgref") or report.get("reference"):
        sections.append(render_side_by_side(report))
    if report.get("kernels") or report.get("bandwidth"):
        sections.append(render_kernels(report))
    if report.get("cli"):
        sections.append(render_cli(report))
    failures = [r for r in all_results(report) if r.get("message")]
    if failures:
        sections.append(["## Failed measurements", ""]
                        + [f"- {r['label']}: {r['message']}" for r in failures])
    return "\n\n".join("\n".join(section) for section in sections) + "\n"


# =============================================================================
# Driver
# =============================================================================

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure rgref's speed and memory at RecurrentGemma-2B sizes.",
        epilog=__doc__.split("Examples:")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", metavar="PARTS", default=",".join(PARTS),
                        help=f"comma-separated parts to run, from {', '.join(PARTS)} "
                             "(default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer steps and repeats, short prompts: checks the tool runs, "
                             "figures are rough")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="threads for every system (default: the number of cores, "
                             "%(default)s)")
    parser.add_argument("--ref-python", metavar="PATH", default=sys.executable,
                        help="interpreter with torch and the official recurrentgemma and/or "
                             "transformers (default: this one)")
    parser.add_argument("--transformers-path", metavar="DIR",
                        help="directory added to the reference interpreter's PYTHONPATH, for a "
                             "transformers installed with pip --target")
    parser.add_argument("--cache", metavar="DIR", default=os.path.join(ROOT, "bench-cache"),
                        help="where the synthetic checkpoints are written once "
                             "(default: bench-cache/)")
    parser.add_argument("--write", metavar="FILE", help="also write the Markdown page to FILE")
    parser.add_argument("--note", action="append", default=[], metavar="TEXT",
                        help="add TEXT to the page's run description (repeatable)")
    parser.add_argument("--timeout", type=float, default=1200.0, metavar="SECONDS",
                        help="kill a measurement running longer than this (default: "
                             "%(default)s)")
    parser.add_argument("--prompt-tokens", type=int, default=512,
                        help="prefill prompt length on the C path (default: %(default)s)")
    parser.add_argument("--numpy-prompt-tokens", type=int, default=512,
                        help="prefill prompt length on the NumPy path (default: %(default)s)")
    parser.add_argument("--decode-steps", type=int, default=16,
                        help="timed decode steps (default: %(default)s)")
    # A shrunk model tests the tool itself in seconds; its figures mean nothing.
    parser.add_argument("--shrink", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--num-blocks", type=int, help=argparse.SUPPRESS)
    # Internal: run one measurement, given as JSON, and print its result.
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    args.parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")

    args.warmup, args.repeats, args.cli_tokens = 2, 5, 16
    args.batch_prompt_tokens, args.scan_steps, args.bandwidth_bytes = 16, 2048, 2**30
    if args.quick:
        args.prompt_tokens = min(args.prompt_tokens, SHORT_PROMPT)
        args.numpy_prompt_tokens = min(args.numpy_prompt_tokens, SHORT_PROMPT)
        args.decode_steps = min(args.decode_steps, 3)
        args.warmup, args.repeats, args.cli_tokens = 1, 2, 4
        args.bandwidth_bytes = 2**28
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_as_worker(args.worker)

    # Stop through SystemExit on SIGTERM, so that subprocess.run kills the running worker.
    signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))
    args.rgref_path = snapshot_package()
    sys.path.insert(0, args.rgref_path)
    try:
        return run_benchmarks(args)
    finally:
        shutil.rmtree(args.rgref_path)


def run_benchmarks(args) -> int:
    report = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "command": display_command([sys.executable, *sys.argv]),
              "threads": args.threads, "load_before": load_average(),
              "machine": machine_info(), "decode_steps": args.decode_steps,
              "warmup": args.warmup, "repeats": args.repeats, "cli_tokens": args.cli_tokens,
              "batch_prompt_tokens": args.batch_prompt_tokens, "notes": list(args.note),
              "kernels_measured": kernel_library_fingerprint(args.rgref_path),
              "kernels_before": kernel_library_fingerprint()}
    if args.quick:
        report["notes"].append("--quick: short prompts and few steps; figures are rough.")
    report["shrunk"] = args.shrink != 1 or args.num_blocks is not None
    if report["shrunk"]:
        report["notes"].append(f"Shrunk model (--shrink {args.shrink}, --num-blocks "
                               f"{args.num_blocks}), not 2B sizes: a test of the tool only.")
    log(f"load average before: {report['load_before']}")

    paths = ensure_checkpoints(args) if {"rgref", "reference", "cli"} & set(args.parts) else {}
    report["weight_gb"] = paths.get("weight_bytes", 0) / GB
    if "bandwidth" in args.parts:
        report["bandwidth"] = measure_bandwidth(args)
    if "kernels" in args.parts:
        report["kernels"] = run_worker(sys.executable, dict(
            kind="kernels", scan_steps=args.scan_steps, repeats=args.repeats), args)
    if "rgref" in args.parts:
        report["bandwidth_around_decode"] = {}
        report["rgref"] = measure_rgref(args, paths["huggingface", "bfloat16"],
                                        report["bandwidth_around_decode"])
    if "reference" in args.parts:
        probe = run_worker(args.ref_python, {"kind": "probe"}, args, args.transformers_path)
        report["probe"] = probe
        if probe.get("torch") and (probe.get("recurrentgemma") or probe.get("transformers")):
            report["reference"] = measure_reference(args, paths, probe)
        else:
            report["reference_skipped"] = (f"{args.ref_python} cannot import torch with "
                                           "recurrentgemma or transformers")
    if "cli" in args.parts:
        report["cli"] = measure_cli(args, paths)
    report["load_after"] = load_average()
    log(f"load average after: {report['load_after']}")
    if kernel_library_fingerprint() != report["kernels_before"]:
        report["notes"].append(
            f"The C kernels in the source tree were rebuilt during this run (now "
            f"{kernel_library_fingerprint()}). The measurements used the copy taken at the "
            "start.")
        log(report["notes"][-1])

    page = render(report)
    sys.stdout.write(page)
    if args.write:
        with open(args.write, "w", encoding="utf-8") as f:
            f.write(page)
        log(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
