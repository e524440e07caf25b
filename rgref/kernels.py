"""The compiled C/OpenMP kernels (csrc/rgref_kernels.c), with NumPy in and out.

`import rgref` does not import this module, and this module loads the extension
`rgref._kernels` only on first use. When the extension is missing, `available()`
returns False, `unavailable_reason()` returns the cause and how to build it, and
every kernel call raises RuntimeError.

Each kernel comes in three variants, chosen with `variant=`:
  "fast"      AVX2+FMA code when the CPU supports it, else the portable code;
              runs on `get_num_threads()` OpenMP threads
  "portable"  the fast structure in plain C (what CPUs without AVX2 run)
  "naive"     plain loops on one thread, written next to the formula
The fast variants split work by channel or output feature, never inside one sum,
so their results are bitwise identical at any thread count. A linear layer also
gives each token the same bits whether it is computed alone or with others.

Notation: B batch, T time, E RG-LRU width; a linear layer maps K input features
to M output features.
"""

from __future__ import annotations

import importlib

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
    variant: str = "fast",
) -> np.ndarray:
    """Run the RG-LRU over T steps; return y (B, T, E) and update `h` in place.

    x, gate_x_pre, gate_a_pre: float32 (B, T, E): the Conv1D output and the two
      gate projections before their sigmoid.
    a_param: float32 (E,), the stored parameter: log a = -8 * gate_a * softplus(a_param).
    segment_pos: int32 (B, T): 0 starts a document (the state resets), -1 is padding.
    h: float32 (B, E), the state before the first step, overwritten with the last state.
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
    if any(np.may_share_memory(h, other) for other in (x, gate_x_pre, gate_a_pre, a_param)):
        raise ValueError("h must not share memory with the other inputs: it is updated in place")

    module = _library()
    ffi = module.ffi
    scan = {
        "fast": module.lib.rgref_rg_lru_scan,
        "portable": module.lib.rgref_rg_lru_scan_portable,
        "naive": module.lib.rgref_rg_lru_scan_naive,
    }[variant]
    y = np.empty_like(x)
    status = scan(
        _pointer(ffi, "float[]", x),
        _pointer(ffi, "float[]", gate_x_pre),
        _pointer(ffi, "float[]", gate_a_pre),
        _pointer(ffi, "float[]", a_param),
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
        kernel = {
            "fast": lib.rgref_linear_bf16,
            "portable": lib.rgref_linear_bf16_portable,
            "naive": lib.rgref_linear_bf16_naive,
        }[variant]
        w_pointer = _pointer(ffi, "uint16_t[]", w)
    else:
        kernel = {
            "fast": lib.rgref_linear_f32,
            "portable": lib.rgref_linear_f32_portable,
            "naive": lib.rgref_linear_f32_naive,
        }[variant]
        w_pointer = _pointer(ffi, "float[]", w)
    bias_pointer = ffi.NULL if bias is None else _pointer(ffi, "float[]", bias)
    num_rows = int(np.prod(x.shape[:-1], dtype=np.int64))
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
