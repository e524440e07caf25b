"""Random RecurrentGemma models for tests, with every parameter random.

The official initialisation zeroes every bias and norm scale, so a model built
that way cannot reveal a missing bias or a norm that ignores its scale. These
parameters are all random, with magnitudes like a trained model's: weights
scaled by 1/sqrt(fan_in), biases and norm scales of order 0.1, and RG-LRU decays
drawn as the official initialisation draws them.
"""

from __future__ import annotations

import numpy as np

from rgref.config import Config
from rgref.model import Model
from rgref.names import expected_shapes


def random_params(config: Config, seed: int, dtype=np.float32) -> dict[str, np.ndarray]:
    """Return a full parameter dict (Hugging Face names) drawn from `seed`."""
    rng = np.random.default_rng(seed)
    params: dict[str, np.ndarray] = {}
    for name, shape in expected_shapes(config).items():
        if name.endswith("recurrent_param"):
            # The official init: draw r^2 uniformly from [0.9^2, 0.999^2] and store
            # log(1/r - 1), so softplus(param) = -log(r) and the decay at gate r_t
            # is r^(8 r_t).
            r = np.sqrt(rng.uniform(0.9**2, 0.999**2, size=shape))
            value = np.log(1 / r - 1)
        elif name.endswith(("norm.weight",)):
            value = rng.normal(0.0, 0.3, size=shape)
        elif name.endswith(("bias", "_bias")):
            value = rng.normal(0.0, 0.1, size=shape)
        elif name.endswith("conv_1d.weight"):
            value = rng.normal(0.0, 1.0 / np.sqrt(shape[-1]), size=shape)
        elif name.endswith("gate_weight"):
            value = rng.normal(0.0, 1.0 / np.sqrt(shape[-1]), size=shape)
        elif name.endswith("embed_tokens.weight"):
            value = rng.normal(0.0, 1.0 / np.sqrt(shape[1]), size=shape)
        else:
            value = rng.normal(0.0, 1.0 / np.sqrt(shape[-1]), size=shape)
        params[name] = value.astype(dtype)
    return params


def random_model(config: Config, seed: int, dtype=np.float32) -> Model:
    """Build a model of `config` with every parameter random (see module doc)."""
    return Model(config, random_params(config, seed), dtype=dtype)
