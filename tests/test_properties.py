"""Invariants of the forward pass, checked on random models with hypothesis.

Each property compares rgref with itself along two routes that must agree:
one-shot vs chunked, padded vs unpadded, packed vs separate documents.
"""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from rgref.config import Config
from rgref.random_model import random_model
from tolerances import assert_close

# Small but complete: both block kinds, lru_width != width, a window shorter
# than the sequences drawn below so every property crosses it.
CONFIG = Config(vocab_size=61, width=16, mlp_width=40, num_heads=2, lru_width=24,
                block_types=("recurrent", "attention", "recurrent", "attention"),
                attention_window=5, logits_soft_cap=30.0)
# The properties check the NumPy specification; test_c_backend_equals_numpy ties
# the C kernels to it.
MODEL = random_model(CONFIG, seed=7)
MODEL.backend = "numpy"

token_lists = st.lists(st.integers(0, CONFIG.vocab_size - 1), min_size=1, max_size=24)


def one_shot(tokens, segment_pos=None):
    logits, _ = MODEL.forward(np.asarray(tokens)[None], segment_pos=None if segment_pos is None
                              else np.asarray(segment_pos)[None])
    return logits[0]


@given(tokens=st.lists(st.integers(0, CONFIG.vocab_size - 1), min_size=2, max_size=30),
       data=st.data())
def test_chunked_equals_one_shot(tokens, data):
    cuts = sorted(data.draw(st.sets(st.integers(1, len(tokens) - 1), max_size=6)))
    bounds = [0, *cuts, len(tokens)]
    cache = None
    pieces = []
    for start, stop in zip(bounds, bounds[1:]):
        logits, cache = MODEL.forward(np.asarray(tokens[start:stop])[None], cache=cache)
        pieces.append(logits[0])
    assert_close(np.concatenate(pieces), one_shot(tokens), "same_math_float32",
                 f"chunks {bounds}")


@given(tokens=token_lists, padding=st.integers(1, 9),
       continuation=st.lists(st.integers(0, CONFIG.vocab_size - 1), max_size=8))
def test_left_padded_equals_unpadded(tokens, padding, continuation):
    """A left-padded row gives the unpadded row's logits, and so does decoding after it."""
    padded_tokens = [0] * padding + tokens
    padded_pos = [-1] * padding + list(range(len(tokens)))
    # Row 0 padded, row 1 another prompt of the full length, as in a batch.
    batch_tokens = np.array([padded_tokens, list(range(len(padded_tokens)))])
    batch_pos = np.array([padded_pos, list(range(len(padded_tokens)))])
    logits, cache = MODEL.forward(batch_tokens, segment_pos=batch_pos)
    assert_close(logits[0, padding:], one_shot(tokens), "same_math_float32",
                 f"padding {padding}")

    alone_cache = MODEL.forward(np.asarray(tokens)[None])[1]
    for step, token in enumerate(continuation):
        logits, cache = MODEL.forward(np.array([[token], [token]]), cache=cache)
        alone, alone_cache = MODEL.forward(np.array([[token]]), cache=alone_cache)
        assert_close(logits[0], alone[0], "same_math_float32", f"decode step {step}")


@given(documents=st.lists(token_lists, min_size=2, max_size=4))
def test_packed_equals_separate(documents):
    tokens = [t for doc in documents for t in doc]
    segment_pos = [p for doc in documents for p in range(len(doc))]
    packed = one_shot(tokens, segment_pos)
    start = 0
    for i, doc in enumerate(documents):
        assert_close(packed[start:start + len(doc)], one_shot(doc), "same_math_float32",
                     f"document {i} of lengths {[len(d) for d in documents]}")
        start += len(doc)


@given(documents=st.lists(token_lists, min_size=2, max_size=3), data=st.data())
def test_packed_chunked_equals_separate(documents, data):
    """Document starts that fall inside later chunks reset every kind of state."""
    tokens = [t for doc in documents for t in doc]
    segment_pos = [p for doc in documents for p in range(len(doc))]
    chunk = data.draw(st.integers(1, 6))
    cache = None
    pieces = []
    for start in range(0, len(tokens), chunk):
        logits, cache = MODEL.forward(np.asarray(tokens[start:start + chunk])[None],
                                      segment_pos=np.asarray(segment_pos[start:start + chunk])[None],
                                      cache=cache)
        pieces.append(logits[0])
    packed = np.concatenate(pieces)
    start = 0
    for i, doc in enumerate(documents):
        assert_close(packed[start:start + len(doc)], one_shot(doc), "same_math_float32",
                     f"document {i}, chunks of {chunk}")
        start += len(doc)


def test_batch_rows_independent():
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, CONFIG.vocab_size, (3, 17))
    logits, _ = MODEL.forward(tokens)
    for row in range(3):
        assert_close(logits[row], one_shot(tokens[row]), "same_math_float32", f"row {row}")


def test_float64_agrees_with_float32():
    model64 = random_model(CONFIG, seed=7, dtype=np.float64)
    model64.backend = "numpy"
    tokens = np.random.default_rng(4).integers(0, CONFIG.vocab_size, (2, 20))
    logits64, _ = model64.forward(tokens)
    logits32, _ = MODEL.forward(tokens)
    assert logits64.dtype == np.float64
    assert logits32.dtype == np.float32
    assert_close(logits32, logits64, "float64_vs_float32", "float32 vs float64")


def test_cache_not_shared_between_copies():
    tokens = np.array([[1, 2, 3, 4, 5, 6]])
    _, cache = MODEL.forward(tokens)
    branch = cache.copy()
    first, _ = MODEL.forward(np.array([[7]]), cache=cache)
    again, _ = MODEL.forward(np.array([[7]]), cache=branch)
    np.testing.assert_array_equal(first, again)


@pytest.mark.skipif("not __import__('rgref.kernels').kernels.available()",
                    reason="C kernels not built")
@given(tokens=st.lists(st.integers(0, CONFIG.vocab_size - 1), min_size=1, max_size=24),
       data=st.data())
def test_c_backend_equals_numpy(tokens, data):
    """The C kernels and the NumPy specification agree, chunked or not, packed or not."""
    cut = data.draw(st.integers(0, len(tokens)))
    restart = data.draw(st.integers(0, len(tokens) - 1))
    segment_pos = np.r_[np.arange(restart), np.arange(len(tokens) - restart)][None]
    runs = {}
    for backend in ("numpy", "c"):
        cache = None
        pieces = []
        for start, stop in ((0, cut), (cut, len(tokens))):
            if stop > start:
                logits, cache = MODEL.forward(np.asarray(tokens[start:stop])[None],
                                              segment_pos=segment_pos[:, start:stop],
                                              cache=cache, backend=backend)
                pieces.append(logits[0])
        runs[backend] = np.concatenate(pieces)
    assert_close(runs["c"], runs["numpy"], "same_math_float32", f"cut {cut}, restart {restart}")
