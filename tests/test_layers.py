"""Single layers against their definitions, on inputs small enough to check by hand."""

import numpy as np
import pytest

from rgref import layers


def test_embedding_scale_of_2b_is_50_5():
    assert layers.embedding_scale(2560) == 50.5
    assert layers.embedding_scale(4096) == 64.0


def test_rms_norm_multiplies_by_one_plus_scale():
    x = np.array([[3.0, 4.0]])
    np.testing.assert_allclose(layers.rms_norm(x, np.zeros(2), eps=0.0),
                               x / np.sqrt(12.5))
    np.testing.assert_allclose(layers.rms_norm(x, np.array([1.0, -1.0]), eps=0.0),
                               x / np.sqrt(12.5) * [2.0, 0.0])


def test_gelu_tanh_values():
    # torch 2.13 `gelu(approximate="tanh")` in float64 gives these values.
    np.testing.assert_allclose(layers.gelu_tanh(np.array([-1.0, 0.0, 1.0, 3.0])),
                               [-0.15880801, 0.0, 0.84119199, 2.99636261], rtol=1e-7)


def test_conv1d_tap_order():
    """Tap W-1 multiplies the current token, tap W-1-s the token s steps back."""
    x = np.zeros((1, 6, 1))
    x[0, 2, 0] = 1.0                                   # an impulse at t = 2
    weight = np.array([[[10.0, 20.0, 30.0, 40.0]]])    # (E=1, 1, W=4)
    y = layers.conv1d(x, np.arange(6)[None], weight, np.zeros(1))
    np.testing.assert_array_equal(y[0, :, 0], [0, 0, 40, 30, 20, 10])


def test_conv1d_stops_at_document_start():
    x = np.ones((1, 6, 1))
    weight = np.ones((1, 1, 4))
    segment_pos = np.array([[0, 1, 2, 0, 1, 2]])
    y = layers.conv1d(x, segment_pos, weight, np.zeros(1))
    np.testing.assert_array_equal(y[0, :, 0], [1, 2, 3, 1, 2, 3])


def test_conv1d_history_needs_both_parts():
    x = np.ones((1, 2, 1))
    with pytest.raises(ValueError, match="got x_history without pos_history"):
        layers.conv1d(x, np.array([[0, 1]]), np.ones((1, 1, 4)), np.zeros(1),
                      x_history=np.zeros((1, 3, 1)))


def test_rope_pairs_split_halves_of_first_half():
    x = np.zeros((1, 1, 1, 8))
    x[..., 0] = 1.0                                     # rotated part is dims 0..3
    rotated = layers.apply_rope(x, np.array([[1]]), max_wavelength=10_000.0)
    # Dim 0 pairs with dim 2 (R/2 = 2 apart) at frequency 1: (cos 1, sin 1).
    np.testing.assert_allclose(rotated[0, 0, 0], [np.cos(1), 0, np.sin(1), 0, 0, 0, 0, 0],
                               atol=1e-12)
    x = np.zeros((1, 1, 1, 8))
    x[..., 4] = 1.0                                     # second half passes through
    np.testing.assert_array_equal(layers.apply_rope(x, np.array([[7]])), x)


def test_local_attention_sees_window_plus_one_keys():
    S, T = 3, 8
    queries = np.zeros((1, T, 1, 4))                    # equal scores: uniform weights
    keys = np.zeros((1, S + T, 4))
    values = np.arange(S + T, dtype=float)[None, :, None] * np.ones(4)
    key_valid = np.concatenate([np.zeros((1, S), bool), np.ones((1, T), bool)], axis=1)
    docs = np.zeros((1, T), int)
    key_docs = np.zeros((1, S + T), int)
    out = layers.local_attention(queries, keys, values, key_valid, docs, key_docs, S)
    # Query t (key index S + t) averages the valid keys among S + t - S ... S + t.
    for t in range(T):
        seen = [k for k in range(t, S + t + 1) if k >= S]
        np.testing.assert_allclose(out[0, t, 0, 0], np.mean(seen))
    assert len([k for k in range(7, S + 7 + 1) if k >= S]) == S + 1


def test_rg_lru_resets_at_document_start():
    E = 2
    x = np.ones((1, 4, E), np.float32)
    zeros = np.zeros((1, E, E), np.float32)
    # Gates sigmoid(0) = 0.5 everywhere.
    y, h = layers.rg_lru(x, np.array([[0, 1, 0, 1]]), np.zeros(E, np.float32),
                         zeros, np.zeros((1, E), np.float32), zeros,
                         np.zeros((1, E), np.float32))
    a = np.exp(-8 * 0.5 * np.log(2))                   # softplus(0) = log 2
    first = 0.5                                         # x * gate_x, no sqrt(1 - a^2)
    second = a * first + 0.5 * np.sqrt(1 - a**2)
    np.testing.assert_allclose(y[0, :, 0], [first, second, first, second], rtol=1e-6)
    np.testing.assert_allclose(h[0], [second, second], rtol=1e-6)
    assert y.dtype == np.float32
