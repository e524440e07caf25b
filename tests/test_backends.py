"""Choosing between the NumPy specification and the compiled C kernels."""

import warnings

import numpy as np
import pytest

from rgref import kernels
from rgref.config import Config
from rgref.model import Model
from rgref.random_model import random_model

CONFIG = Config(vocab_size=50, width=16, mlp_width=32, num_heads=2, lru_width=24,
                block_types=("recurrent", "attention"), attention_window=4)
TOKENS = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])
needs_kernels = pytest.mark.skipif(not kernels.available(),
                                   reason=f"C kernels not built: {kernels.unavailable_reason()}")


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        random_model(CONFIG, seed=1).forward(TOKENS, backend="gpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        Model(CONFIG, random_model(CONFIG, seed=1).params, backend="cuda")


def test_float64_runs_on_numpy():
    model = random_model(CONFIG, seed=1, dtype=np.float64)
    assert model.resolve_backend("auto") == "numpy"
    with pytest.raises(ValueError, match="computes in float32"):
        model.forward(TOKENS, backend="c")


def test_auto_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(kernels, "available", lambda: False)
    monkeypatch.setattr(kernels, "unavailable_reason", lambda: "the extension is missing: "
                        "build it with `make build`")
    model = random_model(CONFIG, seed=1)
    with pytest.warns(RuntimeWarning, match="NumPy backend.*make build"):
        assert model.resolve_backend() == "numpy"
    with pytest.raises(RuntimeError, match="backend 'c' requested but the extension"):
        model.forward(TOKENS, backend="c")


def test_numpy_backend_is_silent():
    model = random_model(CONFIG, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.forward(TOKENS, backend="numpy")


@needs_kernels
def test_auto_uses_kernels_when_built():
    assert random_model(CONFIG, seed=1).resolve_backend() == "c"


@needs_kernels
def test_thread_count_does_not_change_results():
    one = random_model(CONFIG, seed=2)
    one.num_threads = 1
    two = random_model(CONFIG, seed=2)
    two.num_threads = 2
    np.testing.assert_array_equal(one.forward(TOKENS)[0], two.forward(TOKENS)[0])


@needs_kernels
def test_models_side_by_side():
    """Two models with different configs and backends in one process keep their results."""
    other = Config(vocab_size=30, width=8, mlp_width=8, num_heads=1, lru_width=8,
                   block_types=("recurrent",), attention_window=2)
    first = random_model(CONFIG, seed=3)
    second = random_model(other, seed=4)
    second.backend = "numpy"
    first_alone = first.forward(TOKENS)[0]
    second_alone = second.forward(TOKENS % 30)[0]
    for _ in range(2):
        np.testing.assert_array_equal(second.forward(TOKENS % 30)[0], second_alone)
        np.testing.assert_array_equal(first.forward(TOKENS)[0], first_alone)


@needs_kernels
def test_bfloat16_weights_on_both_backends(tmp_path):
    from rgref import load
    from rgref.saving import save
    from tolerances import assert_close

    save(random_model(CONFIG, seed=5), tmp_path, weights_dtype="bfloat16")
    model = load(tmp_path)
    assert_close(model.forward(TOKENS, backend="c")[0], model.forward(TOKENS, backend="numpy")[0],
                 "same_math_float32", "bfloat16 weights, C vs NumPy")
