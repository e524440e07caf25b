"""Every numerical tolerance the tests use, with the reason for each.

`assert_close` fails with the worst absolute and relative error, where it
occurred, and a few (actual, expected) pairs.
"""

from __future__ import annotations

import numpy as np

# name: (absolute tolerance, reason)
TOLERANCES = {
    "golden_float32": (
        1e-4,
        "rgref float32 vs the official PyTorch float32 run: same operations in a "
        "different summation order (BLAS, einsum) differ by float32 rounding; measured "
        "at most 1.8e-5 (NumPy backend) and 1.1e-5 (C backend) on logits of magnitude up "
        "to ~20. 1e-4 is the acceptance bound "
        "for an exact port; a real semantic error (a missing bias, an off-by-one "
        "window) moves logits by 1e-2 or more."),
    "golden_float64": (
        1e-4,
        "rgref float64 vs the official float32 run: the difference is the float32 "
        "run's own rounding error, same bound as float32."),
    "same_math_float32": (
        2e-5,
        "rgref against itself along two routes that do the same arithmetic in a "
        "different grouping (chunked vs one-shot, padded vs unpadded, one batch row "
        "vs another): BLAS picks different kernels per shape, so float32 results "
        "differ by a few ulps of values up to ~10, amplified through a few blocks."),
    "float64_vs_float32": (
        1e-4,
        "rgref float64 vs rgref float32 on the same model: the float32 rounding error "
        "of a small model, the same bound as the golden comparison."),
}


def tolerance(name: str) -> float:
    return TOLERANCES[name][0]


def assert_close(actual, expected, name: str, label: str = "", mask=None) -> None:
    """Assert max |actual - expected| <= the named tolerance, explaining any failure.

    mask: optional boolean array broadcastable over the leading axes; only
    positions where it is True are compared (e.g. to skip padding).
    """
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (
        f"{label}: shape {actual.shape} differs from expected {expected.shape}")
    error = np.abs(actual - expected)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        mask = mask.reshape(mask.shape + (1,) * (error.ndim - mask.ndim))
        error = np.where(mask, error, 0.0)
    atol = tolerance(name)
    worst = np.unravel_index(np.argmax(error), error.shape)
    if error[worst] <= atol:
        return
    order = np.argsort(error, axis=None)[::-1][:5]
    pairs = ", ".join(
        f"{tuple(int(i) for i in np.unravel_index(k, error.shape))}: "
        f"{actual.flat[k]:.6g} vs {expected.flat[k]:.6g}" for k in order)
    relative = error[worst] / max(abs(expected[worst]), 1e-12)
    raise AssertionError(
        f"{label}: max |error| {error[worst]:.3g} at index {tuple(int(i) for i in worst)} "
        f"exceeds {atol:g} ({name}); relative error there {relative:.3g}; "
        f"{int((error > atol).sum())} of {error.size} values differ. Worst pairs "
        f"(actual vs expected): {pairs}")
