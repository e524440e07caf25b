"""Use rgref as the oracle in the pytest suite of another RecurrentGemma port.

Copy this file into your project and replace `TinyPort` with your port. Here
it runs with `python -m pytest examples` from the rgref repository root, or
from anywhere once rgref is installed (`pip install -e .`).

The workflow: build a random model with rgref, save it as a checkpoint that
the port loads, run both on the same tokens, and compare the logits and the
named intermediate activations (listed in docs/ORACLE.md).

`TinyPort` is a stand-in of a few lines. It reads the saved files with the
`safetensors` package and implements the embedding and the output head (final
RMSNorm, tied unembedding, soft cap) on its own. For its full forward pass it
loads the same files with rgref, which shows the end-to-end comparison.
"""

import json

import numpy as np
import pytest
import safetensors.numpy

import rgref
from rgref.config import Config
from rgref.random_model import random_model
from rgref.saving import save

# Small, with both block kinds, lru_width != width and a window shorter than the prompt.
CONFIG = Config(vocab_size=97, width=32, mlp_width=64, num_heads=4, lru_width=48,
                block_types=("recurrent", "recurrent", "attention"), attention_window=8)
TOKENS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, size=(2, 20))  # (B, T)
# A float32 port differs from rgref by float32 rounding: rgref's own float32 and float64
# logits differ by 2.6e-6 here. Dropping one bias, or one key from the attention window,
# moves them by 0.2 to 0.9.
ATOL = 1e-4


def round_to_bfloat16(value):
    """Round a float32 to the nearest bfloat16 (ties to even), returned as float32."""
    bits = np.array(value, np.float32).view(np.uint32)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


class TinyPort:
    """The port under test: here only the embedding and the output head."""

    def __init__(self, directory):
        with open(directory / "config.json", encoding="utf-8") as f:
            self.config = json.load(f)
        self.weights = safetensors.numpy.load_file(directory / "model.safetensors")
        self.table = self.weights["model.embed_tokens.weight"]              # (V, D)

    def embed(self, tokens):
        # The official models scale by sqrt(width) rounded to bfloat16 (50.5 for the 2B).
        return self.table[tokens] * round_to_bfloat16(np.sqrt(self.table.shape[1]))

    def final_norm(self, hidden):
        scale = self.weights["model.final_norm.weight"]
        mean_square = np.mean(hidden**2, axis=-1, keepdims=True)
        return hidden / np.sqrt(mean_square + self.config["rms_norm_eps"]) * (1 + scale)

    def head(self, hidden):
        logits = self.final_norm(hidden) @ self.table.T                      # (B, T, V)
        cap = self.config["logits_soft_cap"]
        return cap * np.tanh(logits / cap) if cap else logits


@pytest.fixture(scope="module")
def oracle():
    return random_model(CONFIG, seed=0)


@pytest.fixture(scope="module")
def reference(oracle):
    logits, _, intermediates = oracle.forward(TOKENS, return_intermediates=True)
    return logits, intermediates


@pytest.fixture(scope="module")
def port(oracle, tmp_path_factory):
    directory = tmp_path_factory.mktemp("checkpoint")
    save(oracle, directory, layout="huggingface")
    return TinyPort(directory)


def test_embeddings(port, reference):
    _, intermediates = reference
    np.testing.assert_allclose(port.embed(TOKENS), intermediates["embeddings"],
                               rtol=0, atol=ATOL)


def test_output_head(port, reference):
    logits, intermediates = reference
    # Feed the port rgref's last block output, so that only the head is compared.
    last_block = intermediates[f"blocks.{CONFIG.num_blocks - 1}.output"]
    np.testing.assert_allclose(port.final_norm(last_block), intermediates["final_norm"],
                               rtol=0, atol=ATOL)
    np.testing.assert_allclose(port.head(last_block), logits, rtol=0, atol=ATOL)


@pytest.mark.parametrize("layout", ["huggingface", "official"])
def test_logits(oracle, reference, tmp_path, layout):
    save(oracle, tmp_path, layout=layout)
    ported = rgref.load(tmp_path)              # stand-in for the port's own loader and forward
    logits, _ = ported.forward(TOKENS)
    np.testing.assert_allclose(logits, reference[0], rtol=0, atol=ATOL)


def test_logits_against_float64(oracle, tmp_path):
    # float64 rgref has almost no rounding error of its own, so what remains is the port's.
    save(oracle, tmp_path)
    logits, _ = rgref.load(tmp_path).forward(TOKENS)
    expected, _ = random_model(CONFIG, seed=0, dtype=np.float64).forward(TOKENS)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=ATOL)
