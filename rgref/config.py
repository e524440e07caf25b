"""Model configuration: the four official presets and Hugging Face `config.json`.

The field names follow Google DeepMind's `recurrentgemma.common.GriffinConfig`
where one exists; `mlp_width` is its `mlp_expanded_width`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from typing import Any, Mapping

RECURRENT = "recurrent"
ATTENTION = "attention"
BLOCK_TYPES = (RECURRENT, ATTENTION)

# Gemma tokenizer size, used by every released RecurrentGemma checkpoint.
GEMMA_VOCAB_SIZE = 256_000


class ConfigError(ValueError):
    """A configuration that no RecurrentGemma model can have."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Hyperparameters of a RecurrentGemma (Griffin or Hawk) model.

    Attributes:
      vocab_size: Number of tokens in the vocabulary (V).
      width: Model width (D): embeddings and the residual stream.
      mlp_width: Hidden width of each MLP half (the gate and the up projection).
      num_heads: Attention query heads (H); also the number of diagonal blocks
        in the RG-LRU gate projections.
      lru_width: Width of the RG-LRU and its Conv1D (E).
      block_types: "recurrent" or "attention" for each residual block, in order.
      attention_window: The local attention window (S). A query at position q
        sees keys at positions q - S ... q, that is S + 1 keys.
      conv1d_width: Temporal width of the causal Conv1D in recurrent blocks.
      embeddings_scale_by_sqrt_dim: Multiply embeddings by sqrt(width), rounded
        to bfloat16.
      logits_soft_cap: `cap * tanh(logits / cap)` on the output, or None.
      rms_norm_eps: Epsilon added to the mean square in RMSNorm.
      rope_max_wavelength: Base of the rotary position embedding frequencies.
    """

    vocab_size: int
    width: int
    mlp_width: int
    num_heads: int
    lru_width: int
    block_types: tuple[str, ...]
    attention_window: int
    conv1d_width: int = 4
    embeddings_scale_by_sqrt_dim: bool = True
    logits_soft_cap: float | None = 30.0
    rms_norm_eps: float = 1e-6
    rope_max_wavelength: float = 10_000.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_types", tuple(self.block_types))
        if self.logits_soft_cap is not None and float(self.logits_soft_cap) == 0.0:
            object.__setattr__(self, "logits_soft_cap", None)
        self.validate()

    @property
    def num_blocks(self) -> int:
        return len(self.block_types)

    @property
    def head_dim(self) -> int:
        """Width of one attention head (K); keys and values have one head of it."""
        return self.width // self.num_heads

    def validate(self) -> None:
        """Raise ConfigError naming the first field that no model can have."""
        for name in ("vocab_size", "width", "mlp_width", "num_heads", "lru_width",
                     "attention_window", "conv1d_width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field {name} must be a positive integer, got {value!r}")
        if not self.block_types:
            raise ConfigError("config field block_types is empty: a model needs at least one block")
        for i, kind in enumerate(self.block_types):
            if kind not in BLOCK_TYPES:
                raise ConfigError(
                    f"config block_types[{i}] is {kind!r}, expected one of {BLOCK_TYPES}")
        if self.width % self.num_heads:
            raise ConfigError(
                f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.lru_width % self.num_heads:
            raise ConfigError(
                f"lru_width {self.lru_width} is not divisible by num_heads {self.num_heads}")
        if ATTENTION in self.block_types and self.head_dim % 4:
            # RoPE rotates the first half of each head, pairing its two quarters.
            raise ConfigError(
                f"head_dim {self.head_dim} (width / num_heads) must be a multiple of 4 "
                "so that RoPE can rotate the first half of each head in pairs")

    # ---------------------------------------------------------------- presets

    @classmethod
    def from_preset(cls, name: str, vocab_size: int = GEMMA_VOCAB_SIZE) -> "Config":
        """Build one of the official presets by name (see `PRESET_NAMES`)."""
        try:
            fields = _PRESETS[name]
        except KeyError:
            raise ConfigError(
                f"unknown preset {name!r}; expected one of {', '.join(PRESET_NAMES)}") from None
        return cls(vocab_size=vocab_size, **fields)

    # ------------------------------------------------------ Hugging Face JSON

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> "Config":
        """Build a config from the dict in a Hugging Face `config.json`.

        Accepts both `block_types` and the older `_block_types` spelling; the
        pattern repeats to `num_hidden_layers` as in transformers. HF
        `intermediate_size` is twice the MLP width because the gate and the up
        projections each get half.
        """
        missing = object()

        def entry(key: str, default: Any = missing) -> Any:
            if key in hf:
                return hf[key]
            if default is missing:
                raise ConfigError(f"config.json has no {key!r} entry; is this a "
                                  "RecurrentGemma checkpoint?")
            return default

        def integer(key: str, default: Any = missing) -> int:
            value = entry(key, default)
            # A whole number written as 2560.0 passes, but text and 2560.5 do not.
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"config.json {key} must be an integer, got {value!r}")
            return value

        def number(key: str, default: Any) -> float:
            value = entry(key, default)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ConfigError(f"config.json {key} must be a number, got {value!r}")
            return float(value)

        def flag(key: str, default: bool) -> bool:
            value = entry(key, default)
            if not isinstance(value, bool):
                raise ConfigError(f"config.json {key} must be true or false, got {value!r}")
            return value

        model_type = hf.get("model_type")
        if model_type is not None and model_type != "recurrent_gemma":
            raise ConfigError(f"config.json has model_type {model_type!r}, "
                              "expected 'recurrent_gemma'")
        pattern = hf.get("block_types", hf.get("_block_types"))
        if pattern is None:
            raise ConfigError("config.json has neither 'block_types' nor '_block_types'")
        if not isinstance(pattern, list) or not pattern:
            raise ConfigError(f"config.json block_types must be a non-empty list, got {pattern!r}")
        num_layers = integer("num_hidden_layers")
        block_types = tuple(itertools.islice(itertools.cycle(pattern), num_layers))

        intermediate = integer("intermediate_size")
        if intermediate % 2:
            raise ConfigError(f"config.json intermediate_size {intermediate} is odd; it must be "
                              "twice the MLP width")
        width = integer("hidden_size")
        num_heads = integer("num_attention_heads")
        kv_heads = hf.get("num_key_value_heads")
        if kv_heads not in (None, 1):
            raise ConfigError(f"config.json num_key_value_heads is {kv_heads}; RecurrentGemma "
                              "attention has exactly one key/value head")
        rotary = hf.get("partial_rotary_factor", 0.5)
        if rotary != 0.5:
            raise ConfigError(f"config.json partial_rotary_factor is {rotary}; only 0.5 "
                              "(RoPE on the first half of each head) is supported")
        activation = hf.get("hidden_activation", "gelu_pytorch_tanh")
        if activation != "gelu_pytorch_tanh":
            raise ConfigError(f"config.json hidden_activation is {activation!r}; only "
                              "'gelu_pytorch_tanh' is supported")
        # null or 0 turns the soft cap off, and a null lru_width means the model width.
        soft_cap = None
        if hf.get("logits_soft_cap", 30.0) is not None:
            soft_cap = number("logits_soft_cap", 30.0)
        lru_width = width if hf.get("lru_width") is None else integer("lru_width")
        return cls(
            vocab_size=integer("vocab_size"),
            width=width,
            mlp_width=intermediate // 2,
            num_heads=num_heads,
            lru_width=lru_width,
            block_types=block_types,
            attention_window=integer("attention_window_size"),
            conv1d_width=integer("conv1d_width", 4),
            embeddings_scale_by_sqrt_dim=flag("embeddings_scale_by_sqrt_dim", True),
            logits_soft_cap=soft_cap or None,
            rms_norm_eps=number("rms_norm_eps", 1e-6),
            rope_max_wavelength=number("rope_theta", 10_000.0),
        )

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "Config":
        """Read a Hugging Face `config.json` file."""
        try:
            with open(path, encoding="utf-8") as f:
                hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                              "is it a config.json?") from None
        if not isinstance(hf, dict):
            raise ConfigError(f"{path} does not contain a JSON object")
        try:
            return cls.from_hf_config(hf)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_hf_config(self) -> dict[str, Any]:
        """Return the Hugging Face `config.json` dict that reads back as this config."""
        return {
            "architectures": ["RecurrentGemmaForCausalLM"],
            "model_type": "recurrent_gemma",
            "vocab_size": self.vocab_size,
            "hidden_size": self.width,
            "intermediate_size": 2 * self.mlp_width,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": 1,
            "num_hidden_layers": self.num_blocks,
            "lru_width": self.lru_width,
            "block_types": list(self.block_types),
            "attention_window_size": self.attention_window,
            "conv1d_width": self.conv1d_width,
            "embeddings_scale_by_sqrt_dim": self.embeddings_scale_by_sqrt_dim,
            "logits_soft_cap": self.logits_soft_cap if self.logits_soft_cap else 0.0,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_max_wavelength,
            "partial_rotary_factor": 0.5,
            "hidden_activation": "gelu_pytorch_tanh",
            "head_dim": self.head_dim,
            "pad_token_id": 0,
            "eos_token_id": 1,
            "bos_token_id": 2,
            "tie_word_embeddings": True,
        }


def _griffin_pattern(num_blocks: int) -> tuple[str, ...]:
    return tuple(itertools.islice(itertools.cycle((RECURRENT, RECURRENT, ATTENTION)),
                                  num_blocks))


# Values from `recurrentgemma.common.Preset` (recurrentgemma 1.0.1).
_PRESETS: dict[str, dict[str, Any]] = {
    "recurrentgemma-2b": dict(
        width=2560, mlp_width=3 * 2560, num_heads=10, lru_width=2560,
        block_types=_griffin_pattern(26), attention_window=2048,
        embeddings_scale_by_sqrt_dim=True, logits_soft_cap=30.0),
    "recurrentgemma-9b": dict(
        width=4096, mlp_width=3 * 4096, num_heads=16, lru_width=4096,
        block_types=_griffin_pattern(38), attention_window=2048,
        embeddings_scale_by_sqrt_dim=True, logits_soft_cap=30.0),
    "griffin-7b": dict(
        width=4096, mlp_width=3 * 4096, num_heads=32, lru_width=5632,
        block_types=_griffin_pattern(32), attention_window=1024,
        embeddings_scale_by_sqrt_dim=False, logits_soft_cap=None),
    "hawk-7b": dict(
        width=4096, mlp_width=3 * 4096, num_heads=32, lru_width=5632,
        block_types=(RECURRENT,) * 32, attention_window=1024,
        embeddings_scale_by_sqrt_dim=False, logits_soft_cap=None),
}

PRESET_NAMES = tuple(_PRESETS)
