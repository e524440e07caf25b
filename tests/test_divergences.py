"""Places where public RecurrentGemma implementations disagree, and rgref's choice.

rgref follows the official `recurrentgemma` package, with which the released
weights were trained. These tests pin that choice so nobody "fixes" rgref
toward another implementation.
"""

import dataclasses
import os

import numpy as np

import rgref
from rgref import layers
from rgref.model import Model
from test_golden import GOLDEN_DIR, read_case
from tolerances import assert_close, tolerance

CASE = "forward_past_window"


def test_window_includes_window_plus_one_keys():
    """Official window: a query at q sees keys q - S ... q (S + 1 keys).

    Hugging Face transformers 5.25 masks `q - k < S` instead (S keys), which
    is the official model with window S - 1. That variant agrees with the
    official logits before position S and departs from them after it.
    """
    _, [(tokens, segment_pos, expected)] = read_case(CASE)
    official_window = rgref.load(os.path.join(GOLDEN_DIR, CASE))
    window = official_window.config.attention_window
    assert tokens.shape[1] > 2 * window

    logits, _ = official_window.forward(tokens, segment_pos=segment_pos)
    assert_close(logits, expected, "golden_float32", "official window")

    transformers_window = Model(
        dataclasses.replace(official_window.config, attention_window=window - 1),
        official_window.params)
    shifted, _ = transformers_window.forward(tokens, segment_pos=segment_pos)
    assert_close(shifted[:, :window], expected[:, :window], "golden_float32",
                 "window - 1 before the window fills")
    departure = np.abs(shifted[:, window:] - expected[:, window:]).max()
    assert departure > 100 * tolerance("golden_float32"), (
        f"a window of S keys should change logits after position S, changed by {departure:g}")


def test_embedding_scale_is_rounded_to_bfloat16():
    """Official models multiply embeddings by bfloat16(sqrt(width)), not sqrt(width)."""
    _, [(tokens, segment_pos, expected)] = read_case("sqrt_width_not_bfloat16")
    model = rgref.load(os.path.join(GOLDEN_DIR, "sqrt_width_not_bfloat16"))
    width = model.config.width
    assert layers.embedding_scale(width) != np.float32(np.sqrt(width))
    logits, _, intermediates = model.forward(tokens, segment_pos=segment_pos,
                                             return_intermediates=True)
    assert_close(logits, expected, "golden_float32", "bfloat16 embedding scale")
    table = model.params["model.embed_tokens.weight"]
    np.testing.assert_array_equal(intermediates["embeddings"],
                                  table[tokens] * np.float32(layers.embedding_scale(width)))
