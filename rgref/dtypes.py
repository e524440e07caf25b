"""bfloat16 in NumPy, which has no such dtype.

A bfloat16 value is the top 16 bits of a float32. rgref keeps bfloat16 tensors
as `np.uint16` arrays of those bits (no model tensor is an integer, so a uint16
weight always means bfloat16) and widens them to float32 where they are used.
"""

from __future__ import annotations

import numpy as np

BFLOAT16_BITS = np.dtype(np.uint16)


def is_bfloat16(array: np.ndarray) -> bool:
    """Return whether `array` holds bfloat16 bits (rgref's uint16 convention)."""
    return array.dtype == BFLOAT16_BITS


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bits (uint16) to float32 exactly."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def float32_to_bfloat16(values: np.ndarray) -> np.ndarray:
    """Round float32 values to the nearest bfloat16 (ties to even); return the bits.

    This is the rounding PyTorch and JAX use. NaN stays NaN (a quiet NaN).
    """
    values = np.asarray(values, dtype=np.float32, order="C")
    bits = values.view(np.uint32)
    rounding_bias = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    rounded = ((bits + rounding_bias) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)
    return rounded


def round_to_bfloat16(values: np.ndarray | float) -> np.ndarray:
    """Round float32 values to bfloat16 and widen them back to float32."""
    return bfloat16_to_float32(float32_to_bfloat16(np.asarray(values, dtype=np.float32)))


def to_compute_dtype(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Return `array` as `dtype` (float32 or float64), widening bfloat16 bits first.

    Returns the input itself when it already has that dtype, so a memory-mapped
    float32 weight is used in place.
    """
    if is_bfloat16(array):
        array = bfloat16_to_float32(array)
    if array.dtype == dtype:
        return array
    return array.astype(dtype)
