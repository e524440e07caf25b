"""The C kernels (rgref.kernels) against float64 NumPy oracles written here.

Every variant ("fast", "portable", "naive") must stay within an error bound
derived for float32 arithmetic (explained next to each oracle), at 1 and at 2
threads. The fast variants must also give bitwise identical results at 1 and 2
threads, and a linear layer the same bits for a token alone or among others.
Tests that need the compiled extension are skipped when it is not built
(`make build`).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rgref import kernels, layers
from rgref.dtypes import bfloat16_to_float32, float32_to_bfloat16

needs_kernels = pytest.mark.skipif(
    not kernels.available(), reason=f"C kernels not built: {kernels.unavailable_reason()}"
)


def test_kernels_built_when_required():
    """CI sets RGREF_REQUIRE_KERNELS=1 so a broken build fails instead of skipping."""
    if os.environ.get("RGREF_REQUIRE_KERNELS") != "1":
        pytest.skip("RGREF_REQUIRE_KERNELS is not set")
    assert kernels.available(), kernels.unavailable_reason()

FAST_VARIANTS = ("fast", "portable")
ALL_VARIANTS = ("fast", "portable", "naive")
THREAD_COUNTS = (1, 2)

# Unit roundoff of float32: one correctly rounded operation has relative error <= U.
U = 2.0**-24

PROPERTY_SETTINGS = dict(
    derandomize=True,
    deadline=None,
    max_examples=30,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@contextlib.contextmanager
def thread_count(num_threads: int):
    """Run the block with the kernels on `num_threads` threads, then restore the default."""
    kernels.set_num_threads(num_threads)
    try:
        yield
    finally:
        kernels.set_num_threads(0)


def assert_within_bound(actual, expected, bound, label: str) -> None:
    """Assert |actual - expected| <= bound elementwise; on failure show the worst elements."""
    actual = np.asarray(actual, dtype=np.float64)
    assert actual.shape == expected.shape, f"{label}: shape {actual.shape} != {expected.shape}"
    error = np.abs(actual - expected)
    excess = error - bound
    if not (excess <= 0).all():  # also fails on NaN
        worst = np.unravel_index(np.nanargmax(np.where(np.isnan(excess), np.inf, excess)),
                                 excess.shape)
        failing = np.argwhere(~(excess <= 0))[:5]
        pairs = ", ".join(
            f"{tuple(int(i) for i in index)}: {actual[tuple(index)]!r} vs "
            f"{expected[tuple(index)]!r} (bound {bound[tuple(index)]:.3g})"
            for index in failing
        )
        raise AssertionError(
            f"{label}: {int((~(excess <= 0)).sum())} of {error.size} elements exceed the "
            f"error bound; worst at {worst}: |error| {error[worst]:.3g} > bound "
            f"{bound[worst]:.3g}. First failures (actual vs expected): {pairs}"
        )


def check_at_each_thread_count(call, expected, bound, label: str) -> np.ndarray:
    """Run call() at each of THREAD_COUNTS, check each output against the oracle bound and
    that all are bitwise equal, and return the 1-thread output."""
    outputs = []
    for num_threads in THREAD_COUNTS:
        with thread_count(num_threads):
            output = call()
        assert_within_bound(output, expected, bound, f"{label} threads={num_threads}")
        outputs.append(output)
    for output in outputs[1:]:
        assert np.array_equal(outputs[0], output), (
            f"{label}: results differ between {THREAD_COUNTS} threads")
    return outputs[0]


# ---------------------------------------------------------------------------
# Linear layer
# ---------------------------------------------------------------------------


def linear_oracle(x, w_f32, bias_f32):
    """Return x @ w.T + bias in float64 and a bound on the float32 error of any kernel.

    A float32 dot product of K terms plus a bias, summed in any order, with or
    without fused multiply-adds, is within gamma(K + 1) * (sum |x_k w_k| + |bias|)
    of the exact value, where gamma(n) = n U / (1 - n U) (Higham, "Accuracy and
    Stability of Numerical Algorithms", 2nd ed., section 3.1). bfloat16 weights
    widen to float32 exactly, so the bound is the same for them.
    """
    x64 = x.astype(np.float64)
    w64 = w_f32.astype(np.float64)
    expected = x64 @ w64.T
    magnitude = np.abs(x64) @ np.abs(w64).T
    if bias_f32 is not None:
        expected = expected + bias_f32.astype(np.float64)
        magnitude = magnitude + np.abs(bias_f32.astype(np.float64))
    terms = w_f32.shape[1] + 1
    gamma = terms * U / (1 - terms * U)
    return expected, gamma * magnitude


def make_linear_case(seed, n, k, m, weight_dtype, bias_kind):
    """Return x (n, k), w (m, k) in `weight_dtype`, w widened to float32, bias and its float32."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, k), dtype=np.float32)
    w_f32 = rng.standard_normal((m, k), dtype=np.float32) * np.float32(0.1)
    if weight_dtype == "bfloat16":
        w = float32_to_bfloat16(w_f32)
        w_f32 = bfloat16_to_float32(w)
    else:
        w = w_f32
    bias = bias_f32 = None
    if bias_kind == "float32":
        bias = bias_f32 = rng.standard_normal(m, dtype=np.float32)
    elif bias_kind == "bfloat16":
        bias = float32_to_bfloat16(rng.standard_normal(m, dtype=np.float32))
        bias_f32 = bfloat16_to_float32(bias)
    return x, w, w_f32, bias, bias_f32


# K from two ranges: short rows (all tail, or a few 8-lane steps) and rows as long as
# the model's. Threads take 96 or 128 rows of W at a time, and a call of fewer than
# 2**17 multiply-adds runs on one thread, so these shapes rarely split;
# test_linear_blocked_shapes and test_linear_model_size cover the split.
linear_shapes = st.tuples(
    st.integers(1, 40),
    st.one_of(st.integers(0, 40), st.integers(2000, 2600)),
    st.integers(1, 100),
)


@needs_kernels
@pytest.mark.parametrize("weight_dtype", ["float32", "bfloat16"])
@settings(**PROPERTY_SETTINGS)
@given(
    shape=linear_shapes,
    bias_kind=st.sampled_from([None, "float32", "bfloat16"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_linear_matches_float64_oracle(weight_dtype, shape, bias_kind, seed):
    n, k, m = shape
    x, w, w_f32, bias, bias_f32 = make_linear_case(seed, n, k, m, weight_dtype, bias_kind)
    expected, bound = linear_oracle(x, w_f32, bias_f32)

    results = {}
    for variant in ALL_VARIANTS:
        for num_threads in THREAD_COUNTS:
            with thread_count(num_threads):
                y = kernels.linear(x, w, bias, variant=variant)
            assert y.dtype == np.float32
            label = f"linear {variant} {weight_dtype} N={n} K={k} M={m} threads={num_threads}"
            assert_within_bound(y, expected, bound, label)
            results[variant, num_threads] = y

    for variant in FAST_VARIANTS:
        assert np.array_equal(results[variant, 1], results[variant, 2]), (
            f"linear {variant}: 1-thread and 2-thread results differ in "
            f"{int((results[variant, 1] != results[variant, 2]).sum())} elements"
        )


@needs_kernels
@pytest.mark.parametrize("variant", FAST_VARIANTS)
@pytest.mark.parametrize("weight_dtype", ["float32", "bfloat16"])
@settings(**PROPERTY_SETTINGS)
@given(shape=linear_shapes, seed=st.integers(0, 2**32 - 1))
def test_linear_row_alone_same_bits(variant, weight_dtype, shape, seed):
    # Decoding computes one token at a time, prefill many: both must give the same bits.
    n, k, m = shape
    x, w, _, bias, _ = make_linear_case(seed, n, k, m, weight_dtype, "float32")
    together = kernels.linear(x, w, bias, variant=variant)
    for row in range(n):
        alone = kernels.linear(x[row : row + 1], w, bias, variant=variant)
        assert np.array_equal(alone[0], together[row]), (
            f"linear {variant} {weight_dtype} N={n} K={k} M={m}: row {row} alone differs "
            f"from the same row computed with the others"
        )


@needs_kernels
@settings(**PROPERTY_SETTINGS)
@given(shape=linear_shapes, seed=st.integers(0, 2**32 - 1))
def test_linear_bfloat16_same_bits_as_widened(shape, seed):
    # Widening bfloat16 to float32 is exact and the summation order is the same.
    n, k, m = shape
    x, w, w_f32, bias, _ = make_linear_case(seed, n, k, m, "bfloat16", "bfloat16")
    for variant in ALL_VARIANTS:
        from_bits = kernels.linear(x, w, bias, variant=variant)
        widened = kernels.linear(x, w_f32, bfloat16_to_float32(bias), variant=variant)
        assert np.array_equal(from_bits, widened), (
            f"linear {variant} N={n} K={k} M={m}: bfloat16 weights and the same weights "
            f"widened to float32 give different results"
        )


@needs_kernels
@pytest.mark.parametrize("weight_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("n", [1, 5])
def test_linear_model_size(weight_dtype, n):
    # The MLP up projection of recurrentgemma-2b: 7680 x 2560.
    x, w, w_f32, bias, bias_f32 = make_linear_case(7, n, 2560, 7680, weight_dtype, "float32")
    expected, bound = linear_oracle(x, w_f32, bias_f32)
    check_at_each_thread_count(lambda: kernels.linear(x, w, bias), expected, bound,
                               f"linear fast {weight_dtype} N={n}")
    naive = kernels.linear(x, w, bias, variant="naive")
    assert_within_bound(naive, expected, bound, f"linear naive {weight_dtype} N={n}")


@needs_kernels
def test_linear_leading_dims_and_out():
    x, w, w_f32, bias, bias_f32 = make_linear_case(3, 6, 19, 11, "float32", "float32")
    expected, bound = linear_oracle(x, w_f32, bias_f32)
    out = np.full((2, 3, 11), np.nan, dtype=np.float32)
    result = kernels.linear(x.reshape(2, 3, 19), w, bias, out=out)
    assert result is out
    assert_within_bound(out.reshape(6, 11), expected, bound, "linear with out=")


@needs_kernels
def test_linear_empty_shapes():
    w = np.ones((4, 3), dtype=np.float32)
    assert kernels.linear(np.zeros((0, 3), np.float32), w).shape == (0, 4)
    # K = 0: every output is the bias.
    bias = np.arange(4, dtype=np.float32)
    y = kernels.linear(np.zeros((2, 0), np.float32), np.zeros((4, 0), np.float32), bias)
    assert np.array_equal(y, np.broadcast_to(bias, (2, 4)))


# Shapes for the matrix-matrix structure's blocking: several 96-row weight blocks per
# thread, several 512-column depth blocks with a K mod 8 tail, and x row counts that
# leave a partial 4-row tile.
GEMM_BLOCKING_SHAPES = [(4, 520, 400), (9, 777, 250), (13, 2056, 193), (66, 264, 97)]


@needs_kernels
@pytest.mark.parametrize("weight_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("n, k, m", GEMM_BLOCKING_SHAPES)
def test_linear_blocked_shapes(weight_dtype, n, k, m):
    x, w, w_f32, bias, bias_f32 = make_linear_case(n * k + m, n, k, m, weight_dtype, "float32")
    expected, bound = linear_oracle(x, w_f32, bias_f32)
    for variant in FAST_VARIANTS:
        together = check_at_each_thread_count(
            lambda: kernels.linear(x, w, bias, variant=variant), expected, bound,
            f"linear {variant} {weight_dtype} N={n} K={k} M={m}")
        # The first and last rows alone take the matrix-vector structure.
        for row in (0, n - 1):
            alone = kernels.linear(x[row : row + 1], w, bias, variant=variant)
            assert np.array_equal(alone[0], together[row]), (
                f"linear {variant} N={n} K={k} M={m}: row {row} alone differs from the "
                f"same row computed with the others")


@contextlib.contextmanager
def avx512_allowed(allowed: bool):
    """Run the block with the AVX-512 code allowed or not, then allow it again."""
    kernels.set_avx512(allowed)
    try:
        yield
    finally:
        kernels.set_avx512(True)


needs_avx512 = pytest.mark.skipif(
    not (kernels.available() and kernels.uses_avx512()),
    reason="the CPU has no AVX-512F/DQ, so the linear layers run no AVX-512 code here",
)


@needs_kernels
def test_set_avx512_switches_the_code():
    available = kernels.uses_avx512()
    with avx512_allowed(False):
        assert not kernels.uses_avx512()
    assert kernels.uses_avx512() == available, "set_avx512(True) did not restore the code"
    with pytest.raises(ValueError, match="True or False"):
        kernels.set_avx512(1)


@needs_avx512
@pytest.mark.parametrize("weight_dtype", ["float32", "bfloat16"])
@settings(**PROPERTY_SETTINGS)
@given(
    # At least GEMM_MIN_ROWS = 4 rows of x, so the matrix-matrix structure runs. M up to
    # 300 gives blocks of 96 W rows and a last block of any size, odd ones included.
    shape=st.tuples(st.integers(4, 24), st.one_of(st.integers(0, 40), st.integers(500, 1100)),
                    st.integers(1, 300)),
    seed=st.integers(0, 2**32 - 1),
)
def test_linear_avx512_same_bits_as_avx2(weight_dtype, shape, seed):
    n, k, m = shape
    x, w, _, bias, _ = make_linear_case(seed, n, k, m, weight_dtype, "float32")
    with thread_count(2):
        wide = kernels.linear(x, w, bias)
        with avx512_allowed(False):
            narrow = kernels.linear(x, w, bias)
    assert np.array_equal(wide, narrow), (
        f"linear {weight_dtype} N={n} K={k} M={m}: the AVX-512 and AVX2 codes differ in "
        f"{int((wide != narrow).sum())} of {wide.size} elements")


# ---------------------------------------------------------------------------
# RG-LRU scan
# ---------------------------------------------------------------------------

# Error bound of one float32 RG-LRU step, first order in U. The constants below are
# twice these first-order figures, to cover second-order terms.
#   exp and log1p: within 1.01 ulp, that is 2.02 U relative. Measured on glibc 2.36:
#   expf 0.50 ulp, log1pf 0.83 ulp. The AVX2 exp: 1.01 ulp (csrc/check_avx2_exp.c).
#   sigmoid 1 / (1 + exp(-z)): 4.1 U relative (exp, then an add and a divide).
#   softplus log1p(exp(z)): 4 U relative, because its condition number is below 1.
#   log_a = (-8 * gate_a) * softplus: 9.1 U relative.
#   a = exp(log_a): off by a * (9.1 U |log_a| + 2.02 U), and a * h by one more U.
#   v = 1 - exp(2 log_a): off by 6.4 U absolute, because a^2 |log_a| <= 1 / (2e).
#   multiplier sqrt(v): off by min(sqrt(dv), dv / sqrt(v)) + U sqrt(v), dv = 16 U.
#   normalized = x * gate_x * multiplier: 6.1 U relative besides the multiplier's error.
#   h = a h + normalized: one more U on each term.
DECAY_ERROR_PER_LOG_A = 20 * U
DECAY_ERROR = 10 * U
NORMALIZED_ERROR = 16 * U
V_ERROR = 16 * U
# exp below -87.34 returns 0 in the AVX2 code and a subnormal in libm, and products
# can underflow: an absolute error below 2^-120 times the magnitudes involved.
UNDERFLOW_ERROR = 2.0**-120


def rg_lru_oracle(x, gate_x_pre, gate_a_pre, a_param, segment_pos, h0):
    """Return y (B, T, E), the last state (B, E) and a bound on the float32 error of y.

    The float64 formula is the RG-LRU of the model; the bound accumulates the
    per-step bound above through h_t = a_t h_{t-1} + normalized_t with a_t <= 1.
    """
    x = x.astype(np.float64)
    gate_x = 1 / (1 + np.exp(-gate_x_pre.astype(np.float64)))
    gate_a = 1 / (1 + np.exp(-gate_a_pre.astype(np.float64)))
    log_a = -8.0 * gate_a * np.logaddexp(0.0, a_param.astype(np.float64))
    a = np.exp(log_a)
    multiplier = np.sqrt(-np.expm1(2 * log_a))
    reset = (segment_pos == 0)[..., None]
    a = np.where(reset, 0.0, a)
    multiplier = np.where(reset, 1.0, multiplier)
    normalized = x * gate_x * multiplier

    with np.errstate(divide="ignore"):
        multiplier_error = np.minimum(np.sqrt(V_ERROR), V_ERROR / multiplier) + U * multiplier
    multiplier_error = np.where(reset, 0.0, multiplier_error)
    gated_magnitude = np.abs(x * gate_x)

    h = h0.astype(np.float64)
    bound = np.zeros_like(h)
    y = np.empty_like(x)
    y_bound = np.empty_like(x)
    for t in range(x.shape[1]):
        decayed = a[:, t] * h
        step_error = (
            (DECAY_ERROR_PER_LOG_A * np.abs(log_a[:, t]) + DECAY_ERROR) * np.abs(decayed)
            + NORMALIZED_ERROR * np.abs(normalized[:, t])
            + gated_magnitude[:, t] * multiplier_error[:, t]
            + UNDERFLOW_ERROR * (1 + np.abs(h) + np.abs(x[:, t]))
        )
        bound = a[:, t] * bound + step_error
        h = decayed + normalized[:, t]
        y[:, t] = h
        y_bound[:, t] = bound
    return y, h, y_bound, bound


def make_segment_pos(rng, batch, time, reset_rate, padding):
    """Positions 0, 1, 2, ... with resets to 0 at random steps, left padding of -1, and
    stray -1 steps (padding must not reset the state)."""
    segment_pos = np.empty((batch, time), dtype=np.int32)
    for b in range(batch):
        position = int(rng.integers(0, 5))  # > 0: continues a document from a cache
        for t in range(time):
            if rng.random() < reset_rate:
                position = 0
            segment_pos[b, t] = position
            position += 1
        if padding:
            pad = int(rng.integers(0, time + 1))
            segment_pos[b, :pad] = -1
            stray = rng.random(time) < 0.1
            segment_pos[b, stray] = -1
    return segment_pos


def make_rg_lru_case(seed, batch, time, width, reset_rate, padding, extreme):
    rng = np.random.default_rng(seed)
    # Gate pre-activations up to +-80 keep exp(-z) finite and sigmoid normal in float32;
    # a_param up to +-25 takes both branches of the stable softplus.
    gate_scale = 30.0 if extreme else 3.0
    x = (rng.standard_normal((batch, time, width)) * 10).astype(np.float32)
    gate_x_pre = np.clip(rng.standard_normal((batch, time, width)) * gate_scale, -80, 80)
    gate_a_pre = np.clip(rng.standard_normal((batch, time, width)) * gate_scale, -80, 80)
    a_param = rng.uniform(-25, 25, width) if extreme else rng.standard_normal(width)
    h0 = (rng.standard_normal((batch, width)) * 10).astype(np.float32)
    segment_pos = make_segment_pos(rng, batch, time, reset_rate, padding)
    return (x, gate_x_pre.astype(np.float32), gate_a_pre.astype(np.float32),
            a_param.astype(np.float32), segment_pos, h0)


@needs_kernels
@settings(**PROPERTY_SETTINGS)
@given(
    batch=st.integers(1, 3),
    time=st.one_of(st.just(1), st.integers(1, 40)),
    width=st.one_of(st.integers(1, 40), st.sampled_from([63, 64, 65, 257])),
    reset_rate=st.sampled_from([0.0, 0.05, 0.3]),
    padding=st.booleans(),
    extreme=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_rg_lru_scan_matches_float64_oracle(batch, time, width, reset_rate, padding,
                                            extreme, seed):
    x, gate_x_pre, gate_a_pre, a_param, segment_pos, h0 = make_rg_lru_case(
        seed, batch, time, width, reset_rate, padding, extreme)
    expected_y, expected_h, y_bound, h_bound = rg_lru_oracle(
        x, gate_x_pre, gate_a_pre, a_param, segment_pos, h0)

    results = {}
    for variant in ALL_VARIANTS:
        for num_threads in THREAD_COUNTS:
            h = h0.copy()
            with thread_count(num_threads):
                y = kernels.rg_lru_scan(x, gate_x_pre, gate_a_pre, a_param, segment_pos, h,
                                        variant=variant)
            label = f"rg_lru_scan {variant} B={batch} T={time} E={width} threads={num_threads}"
            assert_within_bound(y, expected_y, y_bound, label + " y")
            assert_within_bound(h, expected_h, h_bound, label + " last state")
            results[variant, num_threads] = y, h

    for variant in FAST_VARIANTS:
        (y1, h1), (y2, h2) = results[variant, 1], results[variant, 2]
        assert np.array_equal(y1, y2), f"rg_lru_scan {variant}: y differs at 1 and 2 threads"
        assert np.array_equal(h1, h2), f"rg_lru_scan {variant}: h differs at 1 and 2 threads"


@needs_kernels
@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_rg_lru_scan_model_width(variant):
    # recurrentgemma-2b's RG-LRU width, two documents packed in the second row.
    x, gate_x_pre, gate_a_pre, a_param, _, h0 = make_rg_lru_case(
        11, 2, 48, 2560, 0.0, False, False)
    segment_pos = np.stack([np.arange(48), np.r_[np.arange(20), np.arange(28)]]).astype(np.int32)
    expected_y, expected_h, y_bound, h_bound = rg_lru_oracle(
        x, gate_x_pre, gate_a_pre, a_param, segment_pos, h0)
    h = h0.copy()
    y = kernels.rg_lru_scan(x, gate_x_pre, gate_a_pre, a_param, segment_pos, h,
                            variant=variant)
    assert_within_bound(y, expected_y, y_bound, f"rg_lru_scan {variant} model width y")
    assert_within_bound(h, expected_h, h_bound, f"rg_lru_scan {variant} model width state")


@needs_kernels
@pytest.mark.parametrize("variant", FAST_VARIANTS)
@pytest.mark.parametrize("batch, time, width", [(1, 40, 1000), (3, 16, 700)])
def test_rg_lru_scan_threads_same_bits(variant, batch, time, width):
    # Scans of fewer than 32768 channel steps run on one thread, so the property test's
    # shapes never split; these are above that size.
    case = make_rg_lru_case(17, batch, time, width, 0.1, True, True)
    x, gate_x_pre, gate_a_pre, a_param, segment_pos, h0 = case
    results = []
    for num_threads in THREAD_COUNTS:
        h = h0.copy()
        with thread_count(num_threads):
            y = kernels.rg_lru_scan(x, gate_x_pre, gate_a_pre, a_param, segment_pos, h,
                                    variant=variant)
        results.append((y, h))
    assert np.array_equal(results[0][0], results[1][0]), (
        f"rg_lru_scan {variant} B={batch} T={time} E={width}: y differs at 1 and 2 threads")
    assert np.array_equal(results[0][1], results[1][1]), (
        f"rg_lru_scan {variant} B={batch} T={time} E={width}: h differs at 1 and 2 threads")


@needs_kernels
@pytest.mark.parametrize("variant", ALL_VARIANTS)
@pytest.mark.parametrize("extreme", [False, True])
def test_rg_lru_scan_given_softplus_same_bits(variant, extreme):
    # Decoding computes softplus(a_param) once per layer and passes it to every call.
    x, gate_x_pre, gate_a_pre, a_param, segment_pos, h0 = make_rg_lru_case(
        23, 2, 9, 300, 0.1, True, extreme)
    softplus_a = kernels.softplus(a_param)
    # expf and log1pf are each within a few units in the last place, and so is their
    # composition relative to the result.
    expected = np.logaddexp(0.0, a_param.astype(np.float64))
    assert_within_bound(softplus_a, expected, 4 * U * expected, "kernels.softplus")
    h_computed, h_given = h0.copy(), h0.copy()
    computed = kernels.rg_lru_scan(x, gate_x_pre, gate_a_pre, a_param, segment_pos,
                                   h_computed, variant=variant)
    given = kernels.rg_lru_scan(x, gate_x_pre, gate_a_pre, a_param, segment_pos, h_given,
                                softplus_a=softplus_a, variant=variant)
    assert np.array_equal(computed, given), (
        f"rg_lru_scan {variant}: y differs with softplus_a given")
    assert np.array_equal(h_computed, h_given), (
        f"rg_lru_scan {variant}: h differs with softplus_a given")
    h_doubled = h0.copy()
    doubled = kernels.rg_lru_scan(x, gate_x_pre, gate_a_pre, a_param, segment_pos, h_doubled,
                                  softplus_a=2 * softplus_a, variant=variant)
    assert not np.array_equal(doubled, given), (
        f"rg_lru_scan {variant}: a different softplus_a left y unchanged")
    with pytest.raises(ValueError, match=r"softplus_a has shape \(299,\)"):
        kernels.rg_lru_scan(x, gate_x_pre, gate_a_pre, a_param, segment_pos, h0.copy(),
                            softplus_a=softplus_a[1:], variant=variant)


@needs_kernels
@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_rg_lru_scan_chunks_continue_state(variant):
    # Scanning T steps at once or in two calls that pass h along gives the same bits.
    x, gate_x_pre, gate_a_pre, a_param, segment_pos, h0 = make_rg_lru_case(
        5, 2, 30, 70, 0.1, True, False)
    h_once = h0.copy()
    y_once = kernels.rg_lru_scan(x, gate_x_pre, gate_a_pre, a_param, segment_pos, h_once,
                                 variant=variant)
    h_split = h0.copy()
    parts = []
    for steps in (slice(0, 13), slice(13, 30)):
        parts.append(kernels.rg_lru_scan(
            np.ascontiguousarray(x[:, steps]), np.ascontiguousarray(gate_x_pre[:, steps]),
            np.ascontiguousarray(gate_a_pre[:, steps]), a_param,
            np.ascontiguousarray(segment_pos[:, steps]), h_split, variant=variant))
    assert np.array_equal(np.concatenate(parts, axis=1), y_once)
    assert np.array_equal(h_split, h_once)


@needs_kernels
def test_rg_lru_scan_empty_shapes():
    width = 5
    a_param = np.zeros(width, np.float32)
    h = np.ones((2, width), np.float32)
    empty = np.zeros((2, 0, width), np.float32)
    y = kernels.rg_lru_scan(empty, empty, empty, a_param, np.zeros((2, 0), np.int32), h)
    assert y.shape == (2, 0, width)
    assert np.array_equal(h, np.ones((2, width), np.float32))


# ---------------------------------------------------------------------------
# Block-diagonal linear layer (RG-LRU gates)
# ---------------------------------------------------------------------------


def block_diagonal_oracle(x, w_f32, bias_f32):
    """Return the block-diagonal map in float64 and a bound on the float32 error.

    Each output is a W-term dot product plus a bias, so the bound of `linear_oracle`
    applies: gamma(W + 1) * (sum |x_r w_rc| + |bias_c|).
    """
    heads, width, _ = w_f32.shape
    x64 = x.astype(np.float64).reshape(*x.shape[:-1], heads, width)
    w64 = w_f32.astype(np.float64)
    expected = np.einsum("...hr,hrc->...hc", x64, w64)
    magnitude = np.einsum("...hr,hrc->...hc", np.abs(x64), np.abs(w64))
    if bias_f32 is not None:
        expected = expected + bias_f32.reshape(heads, width)
        magnitude = magnitude + np.abs(bias_f32.reshape(heads, width))
    terms = width + 1
    gamma = terms * U / (1 - terms * U)
    return expected.reshape(x.shape), (gamma * magnitude).reshape(x.shape)


def make_block_diagonal_case(seed, n, heads, width, weight_dtype, with_bias):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, heads * width), dtype=np.float32)
    w_f32 = rng.standard_normal((heads, width, width), dtype=np.float32) * np.float32(0.1)
    w = w_f32
    if weight_dtype == "bfloat16":
        w = float32_to_bfloat16(w_f32)
        w_f32 = bfloat16_to_float32(w)
    bias = rng.standard_normal((heads, width), dtype=np.float32) if with_bias else None
    return x, w, w_f32, bias


@needs_kernels
@pytest.mark.parametrize("weight_dtype", ["float32", "bfloat16"])
@settings(**PROPERTY_SETTINGS)
@given(
    n=st.integers(1, 20),
    heads=st.integers(1, 4),
    # Multiples of 16 take the AVX2 tiles, and with N < 4 multiples of 64 the one-row
    # tiles of 64 columns; other widths take the portable ones.
    width=st.one_of(st.sampled_from([16, 32, 48, 64, 128]), st.integers(1, 40)),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_block_diagonal_matches_float64_oracle(weight_dtype, n, heads, width, with_bias,
                                               seed):
    x, w, w_f32, bias = make_block_diagonal_case(seed, n, heads, width, weight_dtype,
                                                 with_bias)
    expected, bound = block_diagonal_oracle(x, w_f32, bias)
    results = {}
    for variant in ALL_VARIANTS:
        for num_threads in THREAD_COUNTS:
            with thread_count(num_threads):
                y = kernels.block_diagonal_linear(x, w, bias, variant=variant)
            label = (f"block_diagonal_linear {variant} {weight_dtype} N={n} H={heads} "
                     f"W={width} threads={num_threads}")
            assert_within_bound(y, expected, bound, label)
            results[variant, num_threads] = y

    for variant in FAST_VARIANTS:
        assert np.array_equal(results[variant, 1], results[variant, 2]), (
            f"block_diagonal_linear {variant}: 1-thread and 2-thread results differ")
        for row in (0, n - 1):
            alone = kernels.block_diagonal_linear(x[row : row + 1], w, bias, variant=variant)
            assert np.array_equal(alone[0], results[variant, 1][row]), (
                f"block_diagonal_linear {variant}: row {row} alone differs from the same "
                f"row computed with the others")
    if weight_dtype == "bfloat16":
        widened = kernels.block_diagonal_linear(x, w_f32, bias)
        assert np.array_equal(widened, results["fast", 1]), (
            "block_diagonal_linear: bfloat16 weights and the same weights widened to "
            "float32 give different results")


# Matrix kernels run on one thread below 2**17 multiply-adds (MIN_PARALLEL_MULTIPLY_ADDS
# in csrc/kernels_common.h), so the property tests' shapes seldom split; these do.
@needs_kernels
@pytest.mark.parametrize("variant", FAST_VARIANTS)
@pytest.mark.parametrize("weight_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("n, heads, width", [(1, 10, 256), (7, 2, 144), (5, 3, 100)])
def test_block_diagonal_threads_same_bits(variant, weight_dtype, n, heads, width):
    x, w, w_f32, bias = make_block_diagonal_case(11, n, heads, width, weight_dtype, True)
    expected, bound = block_diagonal_oracle(x, w_f32, bias)
    check_at_each_thread_count(
        lambda: kernels.block_diagonal_linear(x, w, bias, variant=variant), expected, bound,
        f"block_diagonal_linear {variant} {weight_dtype} N={n} H={heads} W={width}")


@needs_kernels
@pytest.mark.parametrize("weight_dtype", ["float32", "bfloat16"])
def test_block_diagonal_model_size(weight_dtype):
    # The RG-LRU gates of recurrentgemma-2b: 10 blocks of 256 x 256, a 3-D input.
    x, w, w_f32, bias = make_block_diagonal_case(3, 14, 10, 256, weight_dtype, True)
    expected, bound = block_diagonal_oracle(x, w_f32, bias)
    for variant in ALL_VARIANTS:
        y = kernels.block_diagonal_linear(x.reshape(2, 7, 2560), w, bias, variant=variant)
        assert y.shape == (2, 7, 2560)
        assert_within_bound(y.reshape(14, 2560), expected, bound,
                            f"block_diagonal_linear {variant} {weight_dtype} model size")


BLOCK_DIAGONAL_INVALID_INPUTS = [
    (dict(x=np.zeros((2, 6))), "x must have dtype float32"),
    (dict(x=np.zeros((2, 8), np.float32)), r"x has 8 features .* expects E = 6"),
    (dict(w=np.zeros((2, 3, 3), np.float16)), "w must be a float32 or uint16"),
    (dict(w=np.zeros((2, 3, 4), np.float32)), r"expected \(H, E/H, E/H\)"),
    (dict(w=np.zeros((6, 6), np.float32)), "w must have 3 dimensions"),
    (dict(bias=np.zeros(5, np.float32)), r"bias has shape \(5,\)"),
]


@needs_kernels
@pytest.mark.parametrize("changes, message", BLOCK_DIAGONAL_INVALID_INPUTS)
def test_block_diagonal_rejects_invalid_input(changes, message):
    arguments = dict(x=np.zeros((2, 6), np.float32), w=np.zeros((2, 3, 3), np.float32),
                     bias=None)
    arguments.update(changes)
    with pytest.raises(ValueError, match=message):
        kernels.block_diagonal_linear(**arguments)


# ---------------------------------------------------------------------------
# Local attention
# ---------------------------------------------------------------------------


def attention_inputs_in_time_order(keys, values, docs, cache_keys, cache_values,
                                   cache_docs, num_cached):
    """Return the S cached tokens (oldest first) and the chunk's, as `layers.local_attention`
    takes them: keys, values (B, S + T, K), key_valid and key docs (B, S + T)."""
    batch, window = cache_docs.shape
    order = (num_cached + np.arange(window)) % window
    exists = num_cached - window + np.arange(window) >= 0
    key_valid = np.concatenate([np.broadcast_to(exists, (batch, window)),
                                np.ones(docs.shape, bool)], axis=1)
    return (np.concatenate([cache_keys[:, order], keys], axis=1),
            np.concatenate([cache_values[:, order], values], axis=1),
            key_valid,
            np.concatenate([cache_docs[:, order], docs], axis=1))


def attention_oracle(queries, keys, values, docs, cache_keys, cache_values, cache_docs,
                     num_cached):
    """Return `layers.local_attention` in float64 and a bound on the float32 error.

    The bound, first order in U and doubled: a logit l_s = (q . k_s) / sqrt(K) is off by
    e_s <= gamma(K + 2) * sum |q_d k_sd| / sqrt(K). Logit errors move p_s by at most
    2 max e relative (softmax is shift invariant). Subtracting the max, exp (within
    1.01 ulp), the sum of the exps and the division add U |l_s - max| + 5 U +
    gamma(S + 1) relative. The output, a sum of S + 1 products, adds gamma(S + 2)
    relative to sum p_s |v_s|.
    """
    window = cache_keys.shape[1]
    batch, time, heads, head_dim = queries.shape
    all_keys, all_values, key_valid, key_docs = (a.astype(np.float64) if a.dtype.kind == "f"
                                                 else a for a in attention_inputs_in_time_order(
        keys, values, docs, cache_keys, cache_values, cache_docs, num_cached))
    q64 = queries.astype(np.float64)
    expected = layers.local_attention(q64, all_keys, all_values, key_valid, docs, key_docs,
                                      window)

    def gamma(n):
        return n * U / (1 - n * U)

    # Recompute the probabilities in float64 to size the bound.
    scale = head_dim**-0.5
    bound = np.zeros_like(expected)
    for t in range(time):
        seen = np.arange(window + time)
        in_window = (seen <= window + t) & (seen >= t)
        mask = in_window[None] & key_valid & (key_docs == docs[:, t : t + 1])   # (B, S + T)
        logits = np.einsum("bhk,blk->bhl", q64[:, t], all_keys) * scale
        logit_error = gamma(head_dim + 2) * np.einsum(
            "bhk,blk->bhl", np.abs(q64[:, t]), np.abs(all_keys)) * scale
        logits = np.where(mask[:, None], logits, -np.inf)
        top = logits.max(axis=-1, keepdims=True)
        probs = np.exp(logits - top)
        probs /= probs.sum(axis=-1, keepdims=True)
        max_error = np.where(mask[:, None], logit_error, 0).max(axis=-1, keepdims=True)
        relative = (2 * max_error + U * np.where(mask[:, None], np.abs(logits - top), 0)
                    + 5 * U + gamma(window + 1) + gamma(window + 2))
        bound[:, t] = 2 * np.einsum("bhl,blk->bhk", probs * relative, np.abs(all_values))
    return expected, bound


def make_attention_case(seed, batch, time, heads, head_dim, window, num_cached, num_docs):
    rng = np.random.default_rng(seed)
    queries = rng.standard_normal((batch, time, heads, head_dim), dtype=np.float32)
    keys = rng.standard_normal((batch, time, head_dim), dtype=np.float32)
    values = rng.standard_normal((batch, time, head_dim), dtype=np.float32)
    cache_keys = rng.standard_normal((batch, window, head_dim), dtype=np.float32)
    cache_values = rng.standard_normal((batch, window, head_dim), dtype=np.float32)
    # Document ids never decrease along the stream, as in the model.
    stream_docs = np.sort(rng.integers(0, num_docs, (batch, num_cached + time)), axis=1)
    docs = stream_docs[:, num_cached:].astype(np.int64)
    cache_docs = np.full((batch, window), -5, np.int64)  # slots never written
    for s in range(max(0, num_cached - window), num_cached):
        cache_docs[:, s % window] = stream_docs[:, s]
    return queries, keys, values, docs, cache_keys, cache_values, cache_docs


@needs_kernels
@settings(**PROPERTY_SETTINGS)
@given(
    batch=st.integers(1, 2),
    time=st.integers(1, 12),
    heads=st.integers(1, 3),
    head_dim=st.sampled_from([1, 8, 12, 32]),
    window=st.integers(1, 9),
    cached_windows=st.sampled_from([0.0, 0.5, 1.0, 2.7]),
    num_docs=st.sampled_from([1, 3]),
    seed=st.integers(0, 2**32 - 1),
)
def test_local_attention_matches_float64_oracle(batch, time, heads, head_dim, window,
                                                cached_windows, num_docs, seed):
    num_cached = int(cached_windows * window)
    case = make_attention_case(seed, batch, time, heads, head_dim, window, num_cached,
                               num_docs)
    expected, bound = attention_oracle(*case, num_cached)
    results = {}
    for variant in ALL_VARIANTS:
        for num_threads in THREAD_COUNTS:
            with thread_count(num_threads):
                out = kernels.local_attention(*case, num_cached, variant=variant)
            label = (f"local_attention {variant} B={batch} T={time} H={heads} K={head_dim} "
                     f"S={window} cached={num_cached} threads={num_threads}")
            assert_within_bound(out, expected, bound, label)
            results[variant, num_threads] = out
    for variant in FAST_VARIANTS:
        assert np.array_equal(results[variant, 1], results[variant, 2]), (
            f"local_attention {variant}: 1-thread and 2-thread results differ")


# As for the block-diagonal kernel: shapes above the one-thread limit of 2**17
# multiply-adds, a prompt chunk and a decoding step at the 2B head size.
@needs_kernels
@pytest.mark.parametrize("variant", FAST_VARIANTS)
@pytest.mark.parametrize("batch, time, heads, head_dim, window, num_cached",
                         [(2, 16, 4, 64, 32, 40), (1, 1, 10, 256, 64, 100)])
def test_local_attention_threads_same_bits(variant, batch, time, heads, head_dim, window,
                                           num_cached):
    case = make_attention_case(13, batch, time, heads, head_dim, window, num_cached, 3)
    expected, bound = attention_oracle(*case, num_cached)
    check_at_each_thread_count(
        lambda: kernels.local_attention(*case, num_cached, variant=variant), expected, bound,
        f"local_attention {variant} B={batch} T={time} H={heads} K={head_dim} S={window}")


@needs_kernels
@pytest.mark.parametrize("variant", FAST_VARIANTS)
@pytest.mark.parametrize("num_cached", [0, 3, 11])
def test_local_attention_last_token_alone_same_bits(variant, num_cached):
    # Decoding the chunk's last token after the others went into the cache gives the
    # same bits as computing it within the chunk.
    batch, time, heads, head_dim, window = 2, 6, 2, 16, 5
    queries, keys, values, docs, cache_keys, cache_values, cache_docs = make_attention_case(
        7, batch, time, heads, head_dim, window, num_cached, 2)
    together = kernels.local_attention(queries, keys, values, docs, cache_keys,
                                       cache_values, cache_docs, num_cached, variant=variant)
    for t in range(time - 1):
        slot = (num_cached + t) % window
        cache_keys[:, slot] = keys[:, t]
        cache_values[:, slot] = values[:, t]
        cache_docs[:, slot] = docs[:, t]
    last = slice(time - 1, time)
    alone = kernels.local_attention(
        np.ascontiguousarray(queries[:, last]), np.ascontiguousarray(keys[:, last]),
        np.ascontiguousarray(values[:, last]), np.ascontiguousarray(docs[:, last]),
        cache_keys, cache_values, cache_docs, num_cached + time - 1, variant=variant)
    assert np.array_equal(alone[:, 0], together[:, -1])


@needs_kernels
@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_local_attention_model_size(variant):
    # recurrentgemma-2b decoding: 10 heads of 256, a full 2048-token window, one token.
    case = make_attention_case(5, 1, 1, 10, 256, 2048, 3000, 1)
    expected, bound = attention_oracle(*case, 3000)
    out = kernels.local_attention(*case, 3000, variant=variant)
    assert_within_bound(out, expected, bound, f"local_attention {variant} model size")


def valid_attention_inputs(batch=1, time=2, heads=2, head_dim=4, window=3):
    return dict(
        queries=np.zeros((batch, time, heads, head_dim), np.float32),
        keys=np.zeros((batch, time, head_dim), np.float32),
        values=np.zeros((batch, time, head_dim), np.float32),
        docs=np.zeros((batch, time), np.int64),
        cache_keys=np.zeros((batch, window, head_dim), np.float32),
        cache_values=np.zeros((batch, window, head_dim), np.float32),
        cache_docs=np.zeros((batch, window), np.int64),
        num_cached=0,
    )


ATTENTION_INVALID_INPUTS = [
    ("queries", np.zeros((1, 2, 4), np.float32), "queries must have 4 dimensions"),
    ("keys", np.zeros((1, 2, 5), np.float32), r"keys has shape \(1, 2, 5\)"),
    ("values", np.zeros((1, 2, 4), np.float64), "values must have dtype float32"),
    ("docs", np.zeros((1, 2), np.int32), "docs must have dtype int64"),
    ("cache_keys", np.zeros((1, 3, 5), np.float32), r"cache_keys has shape \(1, 3, 5\)"),
    ("cache_values", np.zeros((1, 4, 4), np.float32), r"cache_values has shape \(1, 4, 4\)"),
    ("cache_docs", np.zeros((1, 4), np.int64), r"cache_docs has shape \(1, 4\)"),
    ("num_cached", -1, "num_cached must be an integer >= 0"),
    ("num_cached", 1.0, "num_cached must be an integer >= 0"),
]


@needs_kernels
@pytest.mark.parametrize("name, value, message", ATTENTION_INVALID_INPUTS)
def test_local_attention_rejects_invalid_input(name, value, message):
    inputs = valid_attention_inputs()
    inputs[name] = value
    with pytest.raises(ValueError, match=message):
        kernels.local_attention(**inputs)


# ---------------------------------------------------------------------------
# Conv1D
# ---------------------------------------------------------------------------


def make_conv1d_case(seed, batch, time, channels, width, reset_rate):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, time, channels), dtype=np.float32)
    weight = rng.standard_normal((channels, 1, width), dtype=np.float32)  # Hugging Face
    bias = rng.standard_normal(channels, dtype=np.float32)
    x_history = rng.standard_normal((batch, width - 1, channels), dtype=np.float32)
    positions = make_segment_pos(rng, batch, width - 1 + time, reset_rate, True)
    positions = positions.astype(np.int64)
    segment_pos = np.ascontiguousarray(positions[:, width - 1:])
    pos_history = np.ascontiguousarray(positions[:, :width - 1])
    return x, segment_pos, weight, bias, x_history, pos_history


@needs_kernels
@settings(**PROPERTY_SETTINGS)
@given(
    batch=st.integers(1, 3),
    time=st.one_of(st.integers(1, 10), st.integers(60, 160)),
    channels=st.integers(1, 40),
    width=st.integers(1, 5),
    reset_rate=st.sampled_from([0.0, 0.2, 0.6]),
    seed=st.integers(0, 2**32 - 1),
)
def test_conv1d_same_bits_as_numpy(batch, time, channels, width, reset_rate, seed):
    # The kernel does NumPy's float32 operations in NumPy's order, so the results are
    # bitwise equal. Up to 480 steps: the fast variant splits them across 2 threads.
    x, segment_pos, weight, bias, x_history, pos_history = make_conv1d_case(
        seed, batch, time, channels, width, reset_rate)
    expected = layers.conv1d(x, segment_pos, weight, bias, x_history, pos_history)
    taps = np.ascontiguousarray(weight[:, 0, :].T)                      # (W, E)
    for variant in ALL_VARIANTS:
        for num_threads in THREAD_COUNTS:
            with thread_count(num_threads):
                y = kernels.conv1d(x, segment_pos, taps, bias, x_history, pos_history,
                                   variant=variant)
            assert np.array_equal(y, expected), (
                f"conv1d {variant} B={batch} T={time} E={channels} W={width} "
                f"threads={num_threads}: {int((y != expected).sum())} of {y.size} values "
                f"differ from rgref.layers.conv1d, worst by {np.abs(y - expected).max():.3g}")


CONV1D_INVALID_INPUTS = [
    ("x", np.zeros((1, 2, 3)), "x must have dtype float32"),
    ("segment_pos", np.zeros((1, 2), np.int32), "segment_pos must have dtype int64"),
    ("taps", np.zeros((4, 2), np.float32), r"taps has shape \(4, 2\), expected \(4, 3\)"),
    ("taps", np.zeros((0, 3), np.float32), "at least one tap"),
    ("bias", np.zeros(2, np.float32), r"bias has shape \(2,\)"),
    ("x_history", np.zeros((1, 2, 3), np.float32), r"x_history has shape \(1, 2, 3\)"),
    ("pos_history", np.zeros((1, 4), np.int64), r"pos_history has shape \(1, 4\)"),
]


@needs_kernels
@pytest.mark.parametrize("name, value, message", CONV1D_INVALID_INPUTS)
def test_conv1d_rejects_invalid_input(name, value, message):
    inputs = dict(x=np.zeros((1, 2, 3), np.float32), segment_pos=np.zeros((1, 2), np.int64),
                  taps=np.zeros((4, 3), np.float32), bias=np.zeros(3, np.float32),
                  x_history=np.zeros((1, 3, 3), np.float32),
                  pos_history=np.zeros((1, 3), np.int64))
    inputs[name] = value
    with pytest.raises(ValueError, match=message):
        kernels.conv1d(**inputs)


# ---------------------------------------------------------------------------
# RMS normalization
# ---------------------------------------------------------------------------


def gamma(n):
    """Higham's gamma(n) = n U / (1 - n U), the error factor of n float32 roundings."""
    return n * U / (1 - n * U)


def rms_norm_oracle(x, scale, eps):
    """Return rms_norm in float64 and a bound on the float32 error of any kernel.

    The sum of D squares, in any order, is within gamma(D + 1) of the exact sum relative
    to it (all terms are positive). The mean and the addition of eps add 2 U, and the
    square root halves the relative error and adds U/2. The division by it adds U, and
    (1 + scale) and the product 2 U: 1 + scale is exact for scale in [-2, -0.5], and
    otherwise |1 + scale| >= 0.5. So |error| <= (gamma(D + 1) / 2 + 6 U) |result|, doubled
    for the second-order terms.
    """
    x64 = x.astype(np.float64)
    rms = np.sqrt(np.mean(x64**2, axis=-1, keepdims=True) + eps)
    expected = x64 / rms * (1 + scale.astype(np.float64))
    bound = 2 * (gamma(x.shape[-1] + 1) / 2 + 6 * U) * np.abs(expected)
    return expected, bound


def make_rms_norm_case(seed, rows, width, scale_of_x):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, width)) * scale_of_x).astype(np.float32)
    scale = rng.standard_normal(width).astype(np.float32)
    return x, scale


@needs_kernels
@settings(**PROPERTY_SETTINGS)
@given(
    rows=st.integers(1, 6),
    width=st.one_of(st.integers(1, 40), st.integers(1000, 3000)),
    scale_of_x=st.sampled_from([1e-4, 1.0, 30.0, 1e4]),
    eps=st.sampled_from([1e-6, 0.0, 0.5]),
    seed=st.integers(0, 2**32 - 1),
)
def test_rms_norm_matches_float64_oracle(rows, width, scale_of_x, eps, seed):
    x, scale = make_rms_norm_case(seed, rows, width, scale_of_x)
    expected, bound = rms_norm_oracle(x, scale, eps)
    results = {}
    for variant in ALL_VARIANTS:
        y = kernels.rms_norm(x, scale, eps, variant=variant)
        assert y.dtype == np.float32
        assert_within_bound(y, expected, bound,
                            f"rms_norm {variant} rows={rows} D={width} eps={eps}")
        results[variant] = y
    assert np.array_equal(results["fast"], results["portable"]), (
        "rms_norm: the fast and portable kernels differ")
    # The NumPy layer in float32 sums the squares in another order, within the same bound.
    assert_within_bound(layers.rms_norm(x, scale, eps), expected, bound,
                        f"layers.rms_norm rows={rows} D={width} eps={eps}")


@needs_kernels
@pytest.mark.parametrize("variant", FAST_VARIANTS)
def test_rms_norm_threads_same_bits(variant):
    # 64 x 2563 elements: above the 2**16 below which the kernel uses one thread, with a
    # width that is not a multiple of 8.
    x, scale = make_rms_norm_case(9, 64, 2563, 3.0)
    expected, bound = rms_norm_oracle(x, scale, 1e-6)
    together = check_at_each_thread_count(
        lambda: kernels.rms_norm(x, scale, 1e-6, variant=variant), expected, bound,
        f"rms_norm {variant} 64 x 2563")
    alone = kernels.rms_norm(x[5:6], scale, 1e-6, variant=variant)
    assert np.array_equal(alone[0], together[5]), "rms_norm: a row alone differs"


@needs_kernels
def test_rms_norm_leading_dims_and_zeros():
    x, scale = make_rms_norm_case(4, 6, 20, 1.0)
    x[2] = 0.0
    y = kernels.rms_norm(x.reshape(2, 3, 20), scale, 1e-6)
    assert y.shape == (2, 3, 20)
    assert np.array_equal(y.reshape(6, 20), kernels.rms_norm(x, scale, 1e-6))
    assert np.array_equal(y.reshape(6, 20)[2], np.zeros(20, np.float32))
    assert kernels.rms_norm(np.zeros((0, 20), np.float32), scale, 1e-6).shape == (0, 20)


RMS_NORM_INVALID_CALLS = [
    (lambda: kernels.rms_norm(np.zeros((2, 3)), np.zeros(3, np.float32), 1e-6),
     "x must have dtype float32"),
    (lambda: kernels.rms_norm(np.zeros((2, 3), np.float32), np.zeros(4, np.float32), 1e-6),
     r"scale has shape \(4,\), expected \(3,\)"),
    (lambda: kernels.rms_norm(np.zeros((2, 3), np.float32), np.zeros(3, np.float32), -1.0),
     "eps must be a number from 0 to the largest float32"),
    # 1e300 would become inf as a float32, and True is not a number here.
    (lambda: kernels.rms_norm(np.zeros((2, 3), np.float32), np.zeros(3, np.float32), 1e300),
     "eps must be a number from 0 to the largest float32"),
    (lambda: kernels.rms_norm(np.zeros((2, 3), np.float32), np.zeros(3, np.float32), True),
     "eps must be a number from 0 to the largest float32"),
    (lambda: kernels.rms_norm(np.zeros((3, 2), np.float32).T, np.zeros(3, np.float32), 1e-6),
     "x must be C-contiguous"),
]


@needs_kernels
@pytest.mark.parametrize("call, message", RMS_NORM_INVALID_CALLS)
def test_rms_norm_rejects_invalid_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------------------
# Elementwise: GELU and the logit soft cap
# ---------------------------------------------------------------------------

# Relative error of tanh: the kernels' own tanh is within 2.7 ulp over every float
# (csrc/check_tanh.c), that is 5.4 U; glibc's tanhf, which the naive kernels call,
# lists 2 ulp. One ulp of a float t is at most 2 U |t|.
TANH_ERROR = 6 * U


def gelu_oracle(x, up):
    """Return gelu_tanh(x) (times up) in float64 and a bound on the float32 error.

    First order, then doubled: u = c (x + a x^3) is off by 7 U relative (the cube,
    two products, the sum of same-sign terms and the float32 constants c and a). An
    argument error of d |u| moves tanh by at most d |tanh u|, so t = tanh(u) is off by
    (7 U + TANH_ERROR) |t|; 1 + t adds U |1 + t|, the product with 0.5 x one U more, and
    the product with `up` another.
    """
    x64 = x.astype(np.float64)
    inner = np.sqrt(2 / np.pi) * (x64 + 0.044715 * x64**3)
    t = np.tanh(inner)
    expected = 0.5 * x64 * (1 + t)
    bound = 0.5 * np.abs(x64) * ((7 * U + TANH_ERROR) * np.abs(t) + U * np.abs(1 + t))
    bound += U * np.abs(expected)
    if up is not None:
        up64 = up.astype(np.float64)
        bound = bound * np.abs(up64) + U * np.abs(expected * up64)
        expected = expected * up64
    return expected, 2 * bound


def soft_cap_oracle(x, cap):
    """Return cap * tanh(x / cap) in float64 and a bound on the float32 error.

    x / cap is off by U relative, which moves tanh by at most U |tanh|; tanh adds
    TANH_ERROR and the product with cap one U: (2 U + TANH_ERROR) |result|, doubled.
    """
    expected = cap * np.tanh(x.astype(np.float64) / cap)
    return expected, 2 * (2 * U + TANH_ERROR) * np.abs(expected)


def make_elementwise_input(seed, n, scale):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(n) * scale).astype(np.float32)


@needs_kernels
@settings(**PROPERTY_SETTINGS)
@given(
    n=st.one_of(st.integers(0, 40), st.integers(1000, 5000)),
    scale=st.sampled_from([0.01, 1.0, 5.0, 100.0]),
    with_up=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_gelu_matches_float64_oracle(n, scale, with_up, seed):
    x = make_elementwise_input(seed, n, scale)
    up = make_elementwise_input(seed + 1, n, 1.0) if with_up else None
    expected, bound = gelu_oracle(x, up)
    for variant in ALL_VARIANTS:
        y = kernels.gelu_tanh(x, up, variant=variant)
        assert y.dtype == np.float32
        assert_within_bound(y, expected, bound, f"gelu_tanh {variant} n={n} scale={scale}")


@needs_kernels
@settings(**PROPERTY_SETTINGS)
@given(
    n=st.one_of(st.integers(0, 40), st.integers(1000, 5000)),
    scale=st.sampled_from([0.01, 1.0, 30.0, 1000.0]),
    cap=st.sampled_from([1.0, 30.0, 50.5]),
    seed=st.integers(0, 2**32 - 1),
)
def test_soft_cap_matches_float64_oracle(n, scale, cap, seed):
    x = make_elementwise_input(seed, n, scale)
    expected, bound = soft_cap_oracle(x, cap)
    for variant in ALL_VARIANTS:
        y = kernels.soft_cap(x, cap, variant=variant)
        assert_within_bound(y, expected, bound,
                            f"soft_cap {variant} n={n} scale={scale} cap={cap}")


@needs_kernels
@pytest.mark.parametrize("variant", FAST_VARIANTS)
def test_elementwise_threads_same_bits(variant):
    # 100003 elements: more than the 16384 per thread below which the kernels use one
    # thread, and not a multiple of 8.
    x = make_elementwise_input(3, 100_003, 20.0)
    up = make_elementwise_input(4, 100_003, 1.0)
    results = {}
    for num_threads in THREAD_COUNTS:
        with thread_count(num_threads):
            results[num_threads] = (kernels.gelu_tanh(x, up, variant=variant),
                                    kernels.soft_cap(x, 30.0, variant=variant))
    assert np.array_equal(results[1][0], results[2][0]), "gelu_tanh differs at 1 and 2 threads"
    assert np.array_equal(results[1][1], results[2][1]), "soft_cap differs at 1 and 2 threads"


@needs_kernels
@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_elementwise_special_values(variant):
    # The same IEEE results as the NumPy formulas, NaN included (gelu(-inf) is
    # -inf * 0 = NaN in both).
    x = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, 1e20, -1e20, 1e-40, -3e38],
                 np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        expected_gelu = layers.gelu_tanh(x)
        expected_cap = layers.soft_cap(x, 30.0)
    np.testing.assert_array_equal(kernels.gelu_tanh(x, variant=variant), expected_gelu)
    np.testing.assert_array_equal(kernels.soft_cap(x, 30.0, variant=variant), expected_cap)


@needs_kernels
def test_soft_cap_in_place():
    x = make_elementwise_input(5, 1001, 50.0)
    expected = kernels.soft_cap(x, 30.0)
    result = kernels.soft_cap(x, 30.0, out=x)
    assert result is x
    assert np.array_equal(x, expected)


def soft_cap_into_overlapping_out():
    buffer = np.zeros(4, np.float32)
    return kernels.soft_cap(buffer[:3], 1.0, out=buffer[1:])


ELEMENTWISE_INVALID_CALLS = [
    (lambda: kernels.gelu_tanh(np.zeros(3)), "x must have dtype float32"),
    (lambda: kernels.gelu_tanh(np.zeros(3, np.float32), np.zeros(4, np.float32)),
     r"up has shape \(4,\)"),
    (lambda: kernels.soft_cap(np.zeros(3, np.float32), 0.0), "cap must be a positive"),
    (lambda: kernels.soft_cap(np.zeros(3, np.float32), float("nan")), "cap must be a positive"),
    (soft_cap_into_overlapping_out, "out must be x itself or not share memory"),
    (lambda: kernels.soft_cap(np.zeros(4, np.float32)[:3], 1.0,
                              out=np.zeros(3, np.float64)), "out must have dtype float32"),
]


@needs_kernels
@pytest.mark.parametrize("call, message", ELEMENTWISE_INVALID_CALLS)
def test_elementwise_rejects_invalid_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------------------
# Threads, loading and input validation
# ---------------------------------------------------------------------------


@needs_kernels
def test_num_threads_setting():
    with thread_count(1):
        assert kernels.get_num_threads() == 1
    with thread_count(3):
        assert kernels.get_num_threads() == (3 if kernels.has_openmp() else 1)
    assert kernels.get_num_threads() >= 1
    for invalid in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="num_threads"):
            kernels.set_num_threads(invalid)


def test_import_rgref_does_not_load_kernels():
    code = ("import sys, rgref; "
            "print('rgref.kernels' in sys.modules, 'rgref._kernels' in sys.modules)")
    root = __file__.rsplit("/tests/", 1)[0]
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=root, check=True).stdout
    assert output.split() == ["False", "False"]


def test_missing_extension_reason(monkeypatch):
    monkeypatch.setattr(kernels, "_module", None)
    monkeypatch.setattr(kernels, "_load_error", None)
    monkeypatch.setitem(sys.modules, "rgref._kernels", None)  # makes the import fail
    assert not kernels.available()
    reason = kernels.unavailable_reason()
    assert "rgref._kernels" in reason
    assert "make build" in reason
    with pytest.raises(RuntimeError, match="make build"):
        kernels.linear(np.zeros((1, 2), np.float32), np.zeros((3, 2), np.float32))


def valid_scan_inputs(batch=2, time=3, width=5):
    return dict(
        x=np.zeros((batch, time, width), np.float32),
        gate_x_pre=np.zeros((batch, time, width), np.float32),
        gate_a_pre=np.zeros((batch, time, width), np.float32),
        a_param=np.zeros(width, np.float32),
        segment_pos=np.zeros((batch, time), np.int32),
        h=np.zeros((batch, width), np.float32),
    )


def read_only(array):
    array.flags.writeable = False
    return array


SCAN_INVALID_INPUTS = [
    ("x", lambda inputs: inputs["x"].astype(np.float64), "x must have dtype float32"),
    ("x", lambda inputs: inputs["x"][0], "x must have 3 dimensions"),
    ("x", lambda inputs: np.zeros((2, 3, 10), np.float32)[:, :, ::2], "x must be C-contiguous"),
    ("gate_x_pre", lambda inputs: np.zeros((2, 3, 4), np.float32), r"gate_x_pre has shape"),
    ("gate_a_pre", lambda inputs: np.zeros((2, 4, 5), np.float32), r"gate_a_pre has shape"),
    ("a_param", lambda inputs: np.zeros(4, np.float32), r"a_param has shape \(4,\)"),
    ("segment_pos", lambda inputs: inputs["segment_pos"].astype(np.int64),
     "segment_pos must have dtype int32"),
    ("segment_pos", lambda inputs: np.zeros((2, 4), np.int32), "segment_pos has shape"),
    ("h", lambda inputs: np.zeros((1, 5), np.float32), r"h has shape \(1, 5\)"),
    ("h", lambda inputs: read_only(np.zeros((2, 5), np.float32)), "h must be writeable"),
    ("h", lambda inputs: [[0.0] * 5] * 2, "h must be a numpy.ndarray"),
]


@needs_kernels
@pytest.mark.parametrize("name, make_invalid, message", SCAN_INVALID_INPUTS)
def test_rg_lru_scan_rejects_invalid_input(name, make_invalid, message):
    inputs = valid_scan_inputs()
    inputs[name] = make_invalid(inputs)
    with pytest.raises(ValueError, match=message):
        kernels.rg_lru_scan(**inputs)


@needs_kernels
def test_rg_lru_scan_rejects_state_aliasing_input():
    inputs = valid_scan_inputs(batch=1, time=1)
    inputs["h"] = inputs["x"][0]  # (1, 5): the same memory as x
    with pytest.raises(ValueError, match="h must not share memory"):
        kernels.rg_lru_scan(**inputs)
    with pytest.raises(ValueError, match="variant"):
        kernels.rg_lru_scan(**valid_scan_inputs(), variant="avx2")


LINEAR_INVALID_INPUTS = [
    (dict(x=np.zeros((2, 4))), "x must have dtype float32"),
    (dict(x=np.float32(1.0)), "x must be a numpy.ndarray with at least 1 dimension"),
    (dict(x=np.zeros((2, 8), np.float32)[:, ::2]), "x must be C-contiguous"),
    (dict(x=np.zeros((2, 5), np.float32)), r"x has 5 features .* expects K = 4"),
    (dict(w=np.zeros((3, 4), np.float16)), "w must be a float32 or uint16"),
    (dict(w=np.zeros((4, 3), np.float32).T), "w must be C-contiguous"),
    (dict(w=np.zeros(4, np.float32)), "w must have 2 dimensions"),
    (dict(bias=np.zeros(2, np.float32)), r"bias has shape \(2,\), expected \(3,\)"),
    (dict(bias=np.zeros(3, np.float64)), "bias must be a float32 or uint16"),
    (dict(out=np.zeros((2, 4), np.float32)), r"out has shape \(2, 4\), expected \(2, 3\)"),
    (dict(out=np.zeros((2, 3), np.float64)), "out must have dtype float32"),
    (dict(out=np.zeros((3, 2), np.float32).T), "out must be C-contiguous"),
    (dict(out=read_only(np.zeros((2, 3), np.float32))), "out must be writeable"),
    (dict(variant="avx2"), "variant must be one of"),
]


@needs_kernels
@pytest.mark.parametrize("changes, message", LINEAR_INVALID_INPUTS)
def test_linear_rejects_invalid_input(changes, message):
    arguments = dict(x=np.zeros((2, 4), np.float32), w=np.zeros((3, 4), np.float32),
                     bias=None, out=None)
    arguments.update(changes)
    variant = arguments.pop("variant", "fast")
    with pytest.raises(ValueError, match=message):
        kernels.linear(**arguments, variant=variant)


@needs_kernels
def test_linear_rejects_out_aliasing_input():
    buffer = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match="out must not share memory"):
        kernels.linear(buffer, np.zeros((4, 4), np.float32), out=buffer)
