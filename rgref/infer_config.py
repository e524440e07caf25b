"""Infer a model configuration from the shapes of its tensors.

An official PyTorch checkpoint (`2b.pt`) has no config file, but its shapes fix
every structural hyperparameter:

| field       | read from                                                        |
|-------------|------------------------------------------------------------------|
| vocab_size, width | the embedding, [V, D]                                      |
| block_types | which blocks have RG-LRU tensors (recurrent) or q_proj (attention) |
| mlp_width   | the MLP gate projection, [M, D]                                  |
| lru_width   | the recurrent linear_x, [E, D] (the width when no block is recurrent) |
| num_heads   | the RG-LRU gate blocks, [H, E/H, E/H], or width / key rows [K, D]  |
| conv1d_width | the Conv1D weight, [E, 1, W]                                    |

The attention window, the logits soft cap and the embedding scale leave no trace
in the shapes. They come from a preset, by default the one preset whose
structure matches.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from rgref.config import ATTENTION, PRESET_NAMES, RECURRENT, Config, ConfigError
from rgref.names import (EMBEDDING, TIED_LM_HEAD, expected_shapes, is_official_layout,
                         official_to_hf)

_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.")


def _shape(tensors: Mapping[str, np.ndarray], name: str) -> tuple[int, ...]:
    try:
        return tuple(np.shape(tensors[name]))
    except KeyError:
        raise ConfigError(f"tensor {name!r} is missing; is this a complete RecurrentGemma "
                          "checkpoint?") from None


def _block_types(tensors: Mapping[str, np.ndarray]) -> tuple[str, ...]:
    indices = {int(m.group(1)) for name in tensors if (m := _LAYER_NAME.match(name))}
    if not indices:
        raise ConfigError("the checkpoint has no tensors named model.layers.N..., so it contains "
                          "no residual blocks; is this a RecurrentGemma checkpoint?")
    for i in range(max(indices) + 1):
        if i not in indices:
            raise ConfigError(f"the checkpoint has tensors for blocks up to {max(indices)} but "
                              f"none for block {i}; the checkpoint is incomplete")
    kinds = []
    for i in range(len(indices)):
        prefix = f"model.layers.{i}.temporal_block."
        recurrent = prefix + "rg_lru.recurrent_param" in tensors
        attention = prefix + "q_proj.weight" in tensors
        if recurrent == attention:
            found = "both RG-LRU and attention" if recurrent else "neither RG-LRU nor attention"
            raise ConfigError(f"block {i} has {found} tensors ({prefix}rg_lru.recurrent_param, "
                              f"{prefix}q_proj.weight), so its type is unknown; the checkpoint "
                              "is corrupt or not a RecurrentGemma checkpoint")
        kinds.append(RECURRENT if recurrent else ATTENTION)
    return tuple(kinds)


def _num_heads(tensors: Mapping[str, np.ndarray], block_types: tuple[str, ...],
               width: int) -> int:
    """Read the head count from the RG-LRU gates and the key projection; both must agree."""
    counts: dict[str, int] = {}
    if RECURRENT in block_types:
        name = f"model.layers.{block_types.index(RECURRENT)}.temporal_block.rg_lru.input_gate_weight"
        counts[name] = _shape(tensors, name)[0]
    if ATTENTION in block_types:
        name = f"model.layers.{block_types.index(ATTENTION)}.temporal_block.k_proj.weight"
        head_dim = _shape(tensors, name)[0]
        if head_dim <= 0 or width % head_dim:
            raise ConfigError(f"tensor {name!r} has {head_dim} rows (the head width), which "
                              f"does not divide the model width {width}")
        counts[name] = width // head_dim
    if len(set(counts.values())) != 1:
        found = ", ".join(f"{n}: {h} heads" for n, h in counts.items())
        raise ConfigError(f"the head count differs between tensors ({found}); the checkpoint "
                          "is corrupt")
    return next(iter(counts.values()))


def _matching_presets(config: Config) -> list[str]:
    """Return the presets whose structure (all but the vocabulary) equals `config`'s."""
    matches = []
    for name in PRESET_NAMES:
        preset = Config.from_preset(name, vocab_size=config.vocab_size)
        if (preset.width, preset.mlp_width, preset.num_heads, preset.lru_width,
                preset.block_types, preset.conv1d_width) == (
                config.width, config.mlp_width, config.num_heads, config.lru_width,
                config.block_types, config.conv1d_width):
            matches.append(name)
    return matches


def infer_config(tensors: Mapping[str, np.ndarray], preset: str | None = None) -> Config:
    """Infer the Config of a checkpoint from its tensor shapes, in either layout.

    `tensors` maps Hugging Face or official names to arrays (only their shapes are
    read). The attention window, logits soft cap and embedding scale come from
    `preset`; when it is None, from the one preset whose structure matches the
    shapes. Raises ConfigError when no preset matches and none was given, or when
    the tensors do not form a complete model (missing, unexpected or misshapen
    tensors, checked against `expected_shapes`).
    """
    if is_official_layout(tensors):
        try:
            tensors = official_to_hf(tensors)
        except KeyError as e:
            raise ConfigError(e.args[0]) from None
    vocab_size, width = _shape(tensors, EMBEDDING)
    block_types = _block_types(tensors)

    mlp_width = _shape(tensors, "model.layers.0.mlp_block.gate_proj.weight")[0]
    lru_width, conv1d_width = width, 4
    if RECURRENT in block_types:
        recurrent = f"model.layers.{block_types.index(RECURRENT)}.temporal_block."
        lru_width = _shape(tensors, recurrent + "linear_x.weight")[0]
        conv1d_width = _shape(tensors, recurrent + "conv_1d.weight")[-1]
    structure = Config(
        vocab_size=vocab_size, width=width, mlp_width=mlp_width,
        num_heads=_num_heads(tensors, block_types, width), lru_width=lru_width,
        block_types=block_types, conv1d_width=conv1d_width,
        attention_window=1)  # replaced below: the window is not in the shapes

    if preset is None:
        matches = _matching_presets(structure)
        if len(matches) != 1:
            raise ConfigError(
                f"the tensor shapes (width {width}, MLP width {mlp_width}, "
                f"{structure.num_heads} heads, LRU width {lru_width}, {len(block_types)} "
                f"blocks) match {'no preset' if not matches else ', '.join(matches)}, so the "
                "attention window, logits soft cap and embedding scale are unknown; pass the "
                "preset that supplies them (the preset argument of rgref.load, or --preset "
                "of rgref.generate and tools/convert_checkpoint.py), one of "
                f"{', '.join(PRESET_NAMES)}")
        preset = matches[0]
    hyper = Config.from_preset(preset)
    config = Config(
        vocab_size=vocab_size, width=width, mlp_width=mlp_width,
        num_heads=structure.num_heads, lru_width=lru_width, block_types=block_types,
        conv1d_width=conv1d_width, attention_window=hyper.attention_window,
        embeddings_scale_by_sqrt_dim=hyper.embeddings_scale_by_sqrt_dim,
        logits_soft_cap=hyper.logits_soft_cap, rms_norm_eps=hyper.rms_norm_eps,
        rope_max_wavelength=hyper.rope_max_wavelength)
    check_shapes(config, tensors)
    return config


def check_shapes(config: Config, tensors: Mapping[str, np.ndarray]) -> None:
    """Raise ConfigError naming the first tensor that is missing, unexpected or misshapen.

    `tensors` uses Hugging Face names. A tied `lm_head.weight` is allowed when it
    has the embedding's shape.
    """
    expected = expected_shapes(config)
    for name, shape in expected.items():
        found = _shape(tensors, name)
        if found != shape:
            raise ConfigError(f"tensor {name!r} has shape {found}, expected {shape} for "
                              f"{config.num_blocks} blocks of width {config.width}; is this a "
                              "RecurrentGemma checkpoint of this configuration?")
    for name in tensors:
        if name in expected:
            continue
        if name == TIED_LM_HEAD and _shape(tensors, name) == expected[EMBEDDING]:
            continue
        raise ConfigError(f"tensor {name!r} is not part of a RecurrentGemma model with "
                          f"{config.num_blocks} blocks; is this a RecurrentGemma checkpoint?")
