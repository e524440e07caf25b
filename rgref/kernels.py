"""The compiled C/OpenMP kernels (csrc/rgref_kernels.c), with NumPy in and out.

`import rgref` does not import this module, and this module loads the extension
`rgref._kernels` only on first use. When the extension is missing, `available()`
returns False, `unavailable_reason()` returns the cause and how to build it, and
every kernel call raises RuntimeError.

Kernels: `rg_lru_scan`, `linear`, `block_diagonal_linear` (the RG-LRU gate
projections), `local_attention` (a chunk of queries over itself and the
key/value cache), `conv1d`, `gelu_tanh`, `soft_cap` and `rms_norm`. `softplus`
computes the decay parameter that `rg_lru_scan` can reuse across calls. Each
kernel comes in three variants, chosen with `variant=`:
  "fast"      AVX2+FMA code when the CPU supports it, else the portable code;
              runs on `get_num_threads()` OpenMP threads. For prompts, `linear`
              runs AVX-512 code where the CPU has it (`uses_avx512()`), with
              the same bits as the AVX2 code
  "portable"  the fast structure in plain C (what CPUs without AVX2 run)
  "naive"     plain loops on one thread, written next to the formula
The fast variants split work by channel, output feature or query, never inside
one sum, so their results are bitwise identical at any thread count. The linear
layers and attention also give each token the same bits whether it is computed
alone or with others.

Notation: B batch, T time, E RG-LRU width, H heads, K head dimension, S window;
a linear layer maps K input features to M output features.
"""

from __future__ import annotations

import importlib
import math

import numpy as np

from rgref.dtypes import bfloat16_to_float32, is_bfloat16

VARIANTS = ("fast", "portable", "naive")

BUILD_HINT = (
    "build it with `make build` in the source tree, or reinstall with `pip install -e .` "
    "(both need a C compiler)"
)

_module = None  # the loaded `rgref._kernels`, once loaded
_load_error: str | None = None  # why loading failed, once it has


def _load():
    """Import `rgref._kernels` once; return it, or None when it is missing."""
    global _module, _load_error
    if _module is None and _load_error is None:
        try:
            _module = importlib.import_module("rgref._kernels")
        except ImportError as error:
            _load_error = f"the compiled extension rgref._kernels could not be imported ({error})"
    return _module


def available() -> bool:
    """Return whether the compiled kernels can be used."""
    return _load() is not None


def unavailable_reason() -> str:
    """Return why the compiled kernels cannot be used and how to fix it ("" if they can)."""
    if _load() is not None:
        return ""
    return f"{_load_error}: {BUILD_HINT}"


def _library():
    module = _load()
    if module is None:
        raise RuntimeError(unavailable_reason())
    return module


def has_openmp() -> bool:
    """Return whether the extension was compiled with OpenMP (else it uses one thread)."""
    return bool(_library().lib.rgref_has_openmp())


def uses_avx2() -> bool:
    """Return whether the "fast" variants run AVX2+FMA code on this CPU."""
    return bool(_library().lib.rgref_uses_avx2())


def uses_avx512() -> bool:
    """Return whether the "fast" linear layers run AVX-512 code for prompts.

    That needs a build with the AVX2 code (x86-64 with GCC or Clang), a CPU with
    AVX-512F and AVX-512DQ, and `set_avx512` not to forbid it.
    The AVX-512 code multiplies and adds in the same order as the AVX2 code, so the
    results are bitwise the same.
    """
    return bool(_library().lib.rgref_uses_avx512())


def set_avx512(allowed: bool) -> None:
    """Allow (the default) or forbid the AVX-512 code of the "fast" linear layers.

    The setting applies to this process. The results do not change, only the speed
    of prompts on CPUs that have AVX-512; tests use it to compare the two codes.
    """
    if not isinstance(allowed, (bool, np.bool_)):
        raise ValueError(f"allowed must be True or False, got {allowed!r}")
    _library().lib.rgref_set_avx512(int(allowed))


def set_num_threads(num_threads: int) -> None:
    """Set the number of threads the "fast" kernels use, or 0 for the OpenMP default.

    The OpenMP default follows OMP_NUM_THREADS, else one thread per core. The
    setting applies to this process. Without OpenMP the kernels use one thread.
    """
    if isinstance(num_threads, bool) or not isinstance(num_threads, (int, np.integer)):
        raise ValueError(f"num_threads must be an integer, got {num_threads!r}")
    if num_threads < 0:
        raise ValueError(f"num_threads must be >= 0 (0 for the OpenMP default), got {num_threads}")
    _library().lib.rgref_set_num_threads(int(num_threads))


def get_num_threads() -> int:
    """Return the number of threads the next "fast" kernel call uses."""
    return int(_library().lib.rgref_get_num_threads())


# ---------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def _check_array(name: str, array, dtype, ndim: int, writeable: bool = False) -> None:
    """Raise ValueError unless `array` is a C-contiguous ndarray of `dtype` and rank `ndim`."""
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{name} must be a numpy.ndarray, got {type(array).__name__}")
    if array.dtype != dtype:
        raise ValueError(
            f"{name} must have dtype {np.dtype(dtype).name}, got {array.dtype.name}: "
            f"convert it with {name}.astype(np.{np.dtype(dtype).name})"
        )
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {array.shape}")
    if not array.flags.c_contiguous:
        raise ValueError(
            f"{name} must be C-contiguous: pass np.ascontiguousarray({name})"
        )
    if writeable and not array.flags.writeable:
        raise ValueError(f"{name} must be writeable: the kernel writes its result into it")


def _check_shape(name: str, array: np.ndarray, expected: tuple[int, ...], legend: str) -> None:
    if array.shape != expected:
        raise ValueError(f"{name} has shape {array.shape}, expected {expected} {legend}")


def _variant_function(lib, name: str, variant: str):
    """Return the C function `name` for "fast", else `name` with the variant as suffix."""
    return getattr(lib, name if variant == "fast" else f"{name}_{variant}")


def _pointer(ffi, ctype: str, array: np.ndarray):
    # from_buffer keeps `array` alive for as long as the pointer object lives.
    return ffi.from_buffer(ctype, array, require_writable=False)


# ---------------------------------------------------------------------------
# RG-LRU scan
# ---------------------------------------------------------------------------


def rg_lru_scan(
    x: np.ndarray,
    gate_x_pre: np.ndarray,
    gate_a_pre: np.ndarray,
    a_param: np.ndarray,
    segment_pos: np.ndarray,
    h: np.ndarray,
    *,
    softplus_a: np.ndarray | None = None,
    variant: str = "fast",
) -> np.ndarray:
    """Run the RG-LRU over T steps; return y (B, T, E) and update `h` in place.

    x, gate_x_pre, gate_a_pre: float32 (B, T, E): the Conv1D output and the two
      gate projections before their sigmoid.
    a_param: float32 (E,), the stored parameter: log a = -8 * gate_a * softplus(a_param).
    segment_pos: int32 (B, T): 0 starts a document (the state resets), -1 is padding.
    h: float32 (B, E), the state before the first step, overwritten with the last state.
    softplus_a: float32 (E,), `softplus(a_param)` computed once for the layer, or None
      to compute it in the call. Decoding passes it: at T = 1 the E softplus
      evaluations take longer than the scan. The result has the same bits either way.
    """
    _check_variant(variant)
    _check_array("x", x, np.float32, 3)
    batch, time, width = x.shape
    for name, gate in (("gate_x_pre", gate_x_pre), ("gate_a_pre", gate_a_pre)):
        _check_array(name, gate, np.float32, 3)
        _check_shape(name, gate, x.shape, "(B, T, E), the shape of x")
    _check_array("a_param", a_param, np.float32, 1)
    _check_shape("a_param", a_param, (width,), "(E,)")
    _check_array("segment_pos", segment_pos, np.int32, 2)
    _check_shape("segment_pos", segment_pos, (batch, time), "(B, T)")
    _check_array("h", h, np.float32, 2, writeable=True)
    _check_shape("h", h, (batch, width), "(B, E)")
    if softplus_a is not None:
        _check_array("softplus_a", softplus_a, np.float32, 1)
        _check_shape("softplus_a", softplus_a, (width,), "(E,)")
    inputs = (x, gate_x_pre, gate_a_pre, a_param) + (() if softplus_a is None else (softplus_a,))
    if any(np.may_share_memory(h, other) for other in inputs):
        raise ValueError("h must not share memory with the other inputs: it is updated in place")

    module = _library()
    ffi = module.ffi
    scan = _variant_function(module.lib, "rgref_rg_lru_scan", variant)
    y = np.empty_like(x)
    status = scan(
        _pointer(ffi, "float[]", x),
        _pointer(ffi, "float[]", gate_x_pre),
        _pointer(ffi, "float[]", gate_a_pre),
        _pointer(ffi, "float[]", a_param),
        ffi.NULL if softplus_a is None else _pointer(ffi, "float[]", softplus_a),
        _pointer(ffi, "int32_t[]", segment_pos),
        _pointer(ffi, "float[]", h),
        _pointer(ffi, "float[]", y),
        batch,
        time,
        width,
    )
    if status != 0:
        raise MemoryError(f"rg_lru_scan could not allocate its scratch buffer of {width} floats")
    return y


def softplus(a_param: np.ndarray) -> np.ndarray:
    """Return softplus(a_param) = log(1 + exp(a_param)) as `rg_lru_scan` computes it.

    a_param: float32 (E,). Pass the result as `rg_lru_scan(..., softplus_a=)`.
    """
    _check_array("a_param", a_param, np.float32, 1)
    module = _library()
    result = np.empty_like(a_param)
    module.lib.rgref_softplus(_pointer(module.ffi, "float[]", a_param),
                              _pointer(module.ffi, "float[]", result), a_param.shape[0])
    return result


# ---------------------------------------------------------------------------
# Linear layer
# ---------------------------------------------------------------------------


def linear(
    x: np.ndarray,
    w: np.ndarray,
    bias: np.ndarray | None = None,
    out: np.ndarray | None = None,
    *,
    variant: str = "fast",
) -> np.ndarray:
    """Return x @ w.T + bias, shape (..., M), written into `out` when given.

    x: float32 (..., K). w: (M, K), float32 or bfloat16 bits (uint16), used in
    place without a copy. bias: (M,), float32 or bfloat16 bits, or None.
    out: float32 (..., M), C-contiguous, not overlapping the inputs.
    """
    _check_variant(variant)
    if not isinstance(x, np.ndarray) or x.ndim < 1:
        shape = getattr(x, "shape", None)
        raise ValueError(
            f"x must be a numpy.ndarray with at least 1 dimension, got {type(x).__name__} "
            f"with shape {shape}"
        )
    _check_array("x", x, np.float32, x.ndim)
    if not isinstance(w, np.ndarray) or w.dtype not in (np.float32, np.uint16):
        dtype = getattr(w, "dtype", type(w).__name__)
        raise ValueError(
            f"w must be a float32 or uint16 (bfloat16 bits) numpy.ndarray, got {dtype}"
        )
    _check_array("w", w, w.dtype, 2)
    num_out, num_in = w.shape
    if x.shape[-1] != num_in:
        raise ValueError(
            f"x has {x.shape[-1]} features in its last dimension but w has shape {w.shape} "
            f"(M, K), which expects K = {num_in}"
        )
    if bias is not None:
        if not isinstance(bias, np.ndarray) or bias.dtype not in (np.float32, np.uint16):
            dtype = getattr(bias, "dtype", type(bias).__name__)
            raise ValueError(
                f"bias must be a float32 or uint16 (bfloat16 bits) numpy.ndarray, got {dtype}"
            )
        _check_array("bias", bias, bias.dtype, 1)
        _check_shape("bias", bias, (num_out,), "(M,), M = w.shape[0]")
        if is_bfloat16(bias):
            bias = bfloat16_to_float32(bias)  # (M,): small, so widened here, not in C
    out_shape = x.shape[:-1] + (num_out,)
    if out is None:
        out = np.empty(out_shape, dtype=np.float32)
    else:
        _check_array("out", out, np.float32, len(out_shape), writeable=True)
        _check_shape("out", out, out_shape, "(..., M)")
        if any(np.may_share_memory(out, a) for a in (x, w) + ((bias,) if bias is not None else ())):
            raise ValueError("out must not share memory with x, w or bias")

    module = _library()
    ffi, lib = module.ffi, module.lib
    if is_bfloat16(w):
        kernel = _variant_function(lib, "rgref_linear_bf16", variant)
        w_pointer = _pointer(ffi, "uint16_t[]", w)
    else:
        kernel = _variant_function(lib, "rgref_linear_f32", variant)
        w_pointer = _pointer(ffi, "float[]", w)
    bias_pointer = ffi.NULL if bias is None else _pointer(ffi, "float[]", bias)
    num_rows = math.prod(x.shape[:-1])
    kernel(
        _pointer(ffi, "float[]", x),
        w_pointer,
        bias_pointer,
        _pointer(ffi, "float[]", out),
        num_rows,
        num_in,
        num_out,
    )
    return out


# ---------------------------------------------------------------------------
# Block-diagonal linear layer (RG-LRU gates)
# ---------------------------------------------------------------------------


def block_diagonal_linear(
    x: np.ndarray,
    w: np.ndarray,
    bias: np.ndarray | None = None,
    *,
    variant: str = "fast",
) -> np.ndarray:
    """Return the block-diagonal map of x: (..., E) -> (..., E), float32.

    x: float32 (..., E). w: (H, E/H, E/H), each block stored [in, out] so that
    block h maps x_h = x[..., h*E/H:(h+1)*E/H] to x_h @ w[h]; float32 or
    bfloat16 bits, used in place. bias: (H, E/H) or (E,), float32 or bfloat16
    bits, or None.
    """
    _check_variant(variant)
    if not isinstance(x, np.ndarray) or x.ndim < 1:
        raise ValueError(
            f"x must be a numpy.ndarray with at least 1 dimension, got {type(x).__name__}"
        )
    _check_array("x", x, np.float32, x.ndim)
    if not isinstance(w, np.ndarray) or w.dtype not in (np.float32, np.uint16):
        dtype = getattr(w, "dtype", type(w).__name__)
        raise ValueError(f"w must be a float32 or uint16 (bfloat16 bits) numpy.ndarray, got {dtype}")
    _check_array("w", w, w.dtype, 3)
    heads, width, width_out = w.shape
    if width_out != width:
        raise ValueError(f"w has shape {w.shape}, expected (H, E/H, E/H): square blocks")
    if x.shape[-1] != heads * width:
        raise ValueError(
            f"x has {x.shape[-1]} features in its last dimension but w has shape {w.shape} "
            f"(H, E/H, E/H), which expects E = {heads * width}"
        )
    if bias is not None:
        if not isinstance(bias, np.ndarray) or bias.dtype not in (np.float32, np.uint16):
            dtype = getattr(bias, "dtype", type(bias).__name__)
            raise ValueError(
                f"bias must be a float32 or uint16 (bfloat16 bits) numpy.ndarray, got {dtype}"
            )
        if bias.size != heads * width:
            raise ValueError(f"bias has shape {bias.shape}, expected (H, E/H) = {(heads, width)}")
        bias = np.ascontiguousarray(bfloat16_to_float32(bias) if is_bfloat16(bias) else bias)
        bias = bias.reshape(heads * width)
    out = np.empty(x.shape, dtype=np.float32)

    module = _library()
    ffi, lib = module.ffi, module.lib
    if is_bfloat16(w):
        kernel = _variant_function(lib, "rgref_block_diagonal_linear_bf16", variant)
        w_pointer = _pointer(ffi, "uint16_t[]", w)
    else:
        kernel = _variant_function(lib, "rgref_block_diagonal_linear_f32", variant)
        w_pointer = _pointer(ffi, "float[]", w)
    num_rows = math.prod(x.shape[:-1])
    kernel(
        _pointer(ffi, "float[]", x),
        w_pointer,
        ffi.NULL if bias is None else _pointer(ffi, "float[]", bias),
        _pointer(ffi, "float[]", out),
        num_rows,
        heads,
        width,
    )
    return out


# ---------------------------------------------------------------------------
# Local attention
# ---------------------------------------------------------------------------


def local_attention(
    queries: np.ndarray,
    keys: np.ndarray,
    values: np.ndarray,
    docs: np.ndarray,
    cache_keys: np.ndarray,
    cache_values: np.ndarray,
    cache_docs: np.ndarray,
    num_cached: int,
    *,
    variant: str = "fast",
) -> np.ndarray:
    """Return local multi-query attention of a chunk over itself and a cache: (B, T, H, K).

    queries: float32 (B, T, H, K), rotated; the kernel scales the logits by K^-0.5.
    keys, values: float32 (B, T, K), the chunk's own (keys rotated); docs: int64
    (B, T) document ids. cache_keys, cache_values: float32 (B, S, K) and
    cache_docs: int64 (B, S), a ring buffer where the token with stream index s
    (0 for the first token ever seen) is in slot s % S. num_cached: how many tokens
    came before the chunk. Query t (stream index num_cached + t) attends to stream
    indices num_cached + t - S ... num_cached + t that exist and share its document:
    S + 1 keys, the official window.
    """
    _check_variant(variant)
    _check_array("queries", queries, np.float32, 4)
    batch, time, heads, head_dim = queries.shape
    for name, array in (("keys", keys), ("values", values)):
        _check_array(name, array, np.float32, 3)
        _check_shape(name, array, (batch, time, head_dim), "(B, T, K)")
    _check_array("docs", docs, np.int64, 2)
    _check_shape("docs", docs, (batch, time), "(B, T)")
    _check_array("cache_keys", cache_keys, np.float32, 3)
    window = cache_keys.shape[1]
    _check_shape("cache_keys", cache_keys, (batch, window, head_dim), "(B, S, K)")
    _check_array("cache_values", cache_values, np.float32, 3)
    _check_shape("cache_values", cache_values, (batch, window, head_dim), "(B, S, K)")
    _check_array("cache_docs", cache_docs, np.int64, 2)
    _check_shape("cache_docs", cache_docs, (batch, window), "(B, S)")
    if isinstance(num_cached, bool) or not isinstance(num_cached, (int, np.integer)) \
            or num_cached < 0:
        raise ValueError(f"num_cached must be an integer >= 0, got {num_cached!r}")
    if window == 0 and num_cached > 0:
        raise ValueError("num_cached must be 0 when the cache has no slots (S = 0)")
    out = np.empty(queries.shape, dtype=np.float32)

    module = _library()
    ffi = module.ffi
    kernel = _variant_function(module.lib, "rgref_local_attention", variant)
    status = kernel(
        _pointer(ffi, "float[]", queries),
        _pointer(ffi, "float[]", keys),
        _pointer(ffi, "float[]", values),
        _pointer(ffi, "int64_t[]", docs),
        _pointer(ffi, "float[]", cache_keys),
        _pointer(ffi, "float[]", cache_values),
        _pointer(ffi, "int64_t[]", cache_docs),
        int(num_cached),
        _pointer(ffi, "float[]", out),
        batch,
        time,
        heads,
        head_dim,
        window,
    )
    if status != 0:
        raise MemoryError(
            f"local_attention could not allocate its scratch buffers of {window + 1} entries"
        )
    return out


# ---------------------------------------------------------------------------
# Elementwise: GELU and the logit soft cap
# ---------------------------------------------------------------------------


def gelu_tanh(x: np.ndarray, up: np.ndarray | None = None, *, variant: str = "fast") -> np.ndarray:
    """Return GELU (tanh approximation) of x, times `up` when given: float32, x's shape.

    x, up: float32, C-contiguous, the same shape. With `up` this is the GeGLU
    product gelu(gate) * up of the MLP block in one pass.
    """
    _check_variant(variant)
    _check_array("x", x, np.float32, getattr(x, "ndim", 0))
    if up is not None:
        _check_array("up", up, np.float32, x.ndim)
        _check_shape("up", up, x.shape, "(the shape of x)")
    out = np.empty(x.shape, dtype=np.float32)
    module = _library()
    ffi = module.ffi
    kernel = _variant_function(module.lib, "rgref_gelu_tanh", variant)
    kernel(_pointer(ffi, "float[]", x), ffi.NULL if up is None else _pointer(ffi, "float[]", up),
           _pointer(ffi, "float[]", out), x.size)
    return out


def rms_norm(x: np.ndarray, scale: np.ndarray, eps: float, *,
             variant: str = "fast") -> np.ndarray:
    """Return x / sqrt(mean(x**2, axis=-1) + eps) * (1 + scale): float32 of x's shape.

    x: float32 (..., D), C-contiguous. scale: float32 (D,), the stored offset from 1.
    eps: a non-negative float. The same formula as `layers.rms_norm`, with the sum of
    squares in another order, so the two agree to a few units in the last place.
    """
    _check_variant(variant)
    if not isinstance(x, np.ndarray) or x.ndim < 1:
        raise ValueError(f"x must be a numpy.ndarray with at least 1 dimension, got "
                         f"{type(x).__name__} with shape {getattr(x, 'shape', None)}")
    _check_array("x", x, np.float32, x.ndim)
    _check_array("scale", scale, np.float32, 1)
    _check_shape("scale", scale, x.shape[-1:], "(D,), D = x.shape[-1]")
    # eps goes to C as a float32, so it must fit one.
    largest = float(np.finfo(np.float32).max)
    if (isinstance(eps, (bool, np.bool_))
            or not isinstance(eps, (int, float, np.integer, np.floating))
            or not 0 <= float(eps) <= largest):
        raise ValueError(f"eps must be a number from 0 to the largest float32 "
                         f"({largest:.4g}), got {eps!r}")
    out = np.empty(x.shape, dtype=np.float32)
    width = x.shape[-1]
    rows = x.size // width if width else 0
    module = _library()
    ffi = module.ffi
    kernel = _variant_function(module.lib, "rgref_rms_norm", variant)
    kernel(_pointer(ffi, "float[]", x), _pointer(ffi, "float[]", scale), float(eps),
           _pointer(ffi, "float[]", out), rows, width)
    return out


def soft_cap(x: np.ndarray, cap: float, *, out: np.ndarray | None = None,
             variant: str = "fast") -> np.ndarray:
    """Return cap * tanh(x / cap), float32 of x's shape; `out` may be x itself.

    cap: a positive float (the model's logit soft cap, 30 in RecurrentGemma).
    """
    _check_variant(variant)
    _check_array("x", x, np.float32, getattr(x, "ndim", 0))
    if not (isinstance(cap, (int, float, np.floating)) and math.isfinite(cap) and cap > 0):
        raise ValueError(f"cap must be a positive finite number, got {cap!r}")
    if out is None:
        out = np.empty(x.shape, dtype=np.float32)
    else:
        _check_array("out", out, np.float32, x.ndim, writeable=True)
        _check_shape("out", out, x.shape, "(the shape of x)")
        if out is not x and np.may_share_memory(out, x):
            raise ValueError("out must be x itself or not share memory with it")
    module = _library()
    ffi = module.ffi
    kernel = _variant_function(module.lib, "rgref_soft_cap", variant)
    kernel(_pointer(ffi, "float[]", x), float(cap), _pointer(ffi, "float[]", out), x.size)
    return out


# ---------------------------------------------------------------------------
# Conv1D
# ---------------------------------------------------------------------------


def conv1d(
    x: np.ndarray,
    segment_pos: np.ndarray,
    taps: np.ndarray,
    bias: np.ndarray,
    x_history: np.ndarray,
    pos_history: np.ndarray,
    *,
    variant: str = "fast",
) -> np.ndarray:
    """Return the causal depthwise Conv1D of x, bitwise equal to `rgref.layers.conv1d`.

    x: float32 (B, T, E); segment_pos: int64 (B, T), 0 at a document start.
    taps: float32 (W, E), the official layout (row W-1 multiplies the current
    token; the Hugging Face weight (E, 1, W) is its transpose). bias: float32 (E,).
    x_history: float32 (B, W-1, E) and pos_history: int64 (B, W-1), the inputs
    before x and their segment_pos, oldest first. "portable" runs the fast code:
    the Conv1D has no AVX2 code.
    """
    _check_variant(variant)
    _check_array("x", x, np.float32, 3)
    batch, time, channels = x.shape
    _check_array("segment_pos", segment_pos, np.int64, 2)
    _check_shape("segment_pos", segment_pos, (batch, time), "(B, T)")
    _check_array("taps", taps, np.float32, 2)
    width = taps.shape[0]
    _check_shape("taps", taps, (width, channels), "(W, E)")
    if width < 1:
        raise ValueError(f"taps has shape {taps.shape}: the Conv1D needs at least one tap")
    _check_array("bias", bias, np.float32, 1)
    _check_shape("bias", bias, (channels,), "(E,)")
    _check_array("x_history", x_history, np.float32, 3)
    _check_shape("x_history", x_history, (batch, width - 1, channels), "(B, W-1, E)")
    _check_array("pos_history", pos_history, np.int64, 2)
    _check_shape("pos_history", pos_history, (batch, width - 1), "(B, W-1)")
    out = np.empty(x.shape, dtype=np.float32)

    module = _library()
    ffi = module.ffi
    kernel = module.lib.rgref_conv1d_naive if variant == "naive" else module.lib.rgref_conv1d
    kernel(
        _pointer(ffi, "float[]", x),
        _pointer(ffi, "int64_t[]", segment_pos),
        _pointer(ffi, "float[]", taps),
        _pointer(ffi, "float[]", bias),
        _pointer(ffi, "float[]", x_history),
        _pointer(ffi, "int64_t[]", pos_history),
        _pointer(ffi, "float[]", out),
        batch,
        time,
        channels,
        width,
    )
    return out
