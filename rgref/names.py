"""Tensor names and shapes of the two checkpoint layouts, and conversion between them.

rgref stores parameters under the Hugging Face `transformers` names and shapes
(linear weights `[out, in]`), so a Hugging Face checkpoint is used as it lies on
disk. The official `recurrentgemma` PyTorch state dict (`blocks.N...`) maps to
the same tensors; only the Conv1D weight and the MLP up projection change
shape. The mapping is the one in transformers' `convert_recurrent_gemma_to_hf.py`.

| official (`recurrentgemma.torch`)                | Hugging Face                                   |
|--------------------------------------------------|------------------------------------------------|
| embedder.input_embedding [V, D]                  | model.embed_tokens.weight [V, D]               |
| final_norm.scale [D]                             | model.final_norm.weight [D]                    |
| blocks.N.{temporal,channel}_pre_norm.scale       | model.layers.N.{temporal,channel}_pre_norm.weight |
| blocks.N.recurrent_block.linear_{x,y,out}.*      | model.layers.N.temporal_block.linear_{x,y,out}.* |
| blocks.N.recurrent_block.conv_1d.w [W, E]        | ...temporal_block.conv_1d.weight [E, 1, W]     |
| blocks.N.recurrent_block.conv_1d.b [E]           | ...temporal_block.conv_1d.bias [E]             |
| blocks.N.recurrent_block.rg_lru.a_param [E]      | ...temporal_block.rg_lru.recurrent_param [E]   |
| ...rg_lru.input_gate.{w,b}                       | ...rg_lru.input_gate_{weight,bias}             |
| ...rg_lru.a_gate.{w,b}                           | ...rg_lru.recurrent_gate_{weight,bias}         |
| blocks.N.attention_block.proj_{q,k,v}.weight     | ...temporal_block.{q,k,v}_proj.weight          |
| blocks.N.attention_block.proj_final.{weight,bias}| ...temporal_block.o_proj.{weight,bias}         |
| blocks.N.mlp_block.ffw_up.w [2, D, M]            | ...mlp_block.{gate,up}_proj.weight [M, D] each |
| blocks.N.mlp_block.ffw_up.b [2, 1, 1, M]         | ...mlp_block.{gate,up}_proj.bias [M] each      |
| blocks.N.mlp_block.ffw_down.{weight,bias}        | ...mlp_block.down_proj.{weight,bias}           |

Both layouts store `a_param` / `recurrent_param` with the same sign: the
recurrence decay is `a = exp(-8 * gate_a * softplus(param))`.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from rgref.config import ATTENTION, RECURRENT, Config

EMBEDDING = "model.embed_tokens.weight"
FINAL_NORM = "model.final_norm.weight"
# Present in some Hugging Face exports; the output layer is tied to the embedding.
TIED_LM_HEAD = "lm_head.weight"


def block_prefix(index: int) -> str:
    return f"model.layers.{index}."


def expected_shapes(config: Config) -> dict[str, tuple[int, ...]]:
    """Return the Hugging Face name and shape of every parameter of `config`'s model."""
    D, M, E, H, K = (config.width, config.mlp_width, config.lru_width, config.num_heads,
                     config.head_dim)
    shapes: dict[str, tuple[int, ...]] = {
        EMBEDDING: (config.vocab_size, D),
        FINAL_NORM: (D,),
    }
    for i, kind in enumerate(config.block_types):
        p = block_prefix(i)
        shapes[p + "temporal_pre_norm.weight"] = (D,)
        shapes[p + "channel_pre_norm.weight"] = (D,)
        t = p + "temporal_block."
        if kind == RECURRENT:
            shapes.update({
                t + "linear_y.weight": (E, D), t + "linear_y.bias": (E,),
                t + "linear_x.weight": (E, D), t + "linear_x.bias": (E,),
                t + "linear_out.weight": (D, E), t + "linear_out.bias": (D,),
                t + "conv_1d.weight": (E, 1, config.conv1d_width), t + "conv_1d.bias": (E,),
                t + "rg_lru.recurrent_param": (E,),
                t + "rg_lru.input_gate_weight": (H, E // H, E // H),
                t + "rg_lru.input_gate_bias": (H, E // H),
                t + "rg_lru.recurrent_gate_weight": (H, E // H, E // H),
                t + "rg_lru.recurrent_gate_bias": (H, E // H),
            })
        else:
            assert kind == ATTENTION
            shapes.update({
                t + "q_proj.weight": (D, D), t + "k_proj.weight": (K, D),
                t + "v_proj.weight": (K, D),
                t + "o_proj.weight": (D, D), t + "o_proj.bias": (D,),
            })
        m = p + "mlp_block."
        shapes.update({
            m + "gate_proj.weight": (M, D), m + "gate_proj.bias": (M,),
            m + "up_proj.weight": (M, D), m + "up_proj.bias": (M,),
            m + "down_proj.weight": (D, M), m + "down_proj.bias": (D,),
        })
    return shapes


# Official name suffix -> Hugging Face name suffix, for tensors that keep their shape.
_RENAMES = [
    ("temporal_pre_norm.scale", "temporal_pre_norm.weight"),
    ("channel_pre_norm.scale", "channel_pre_norm.weight"),
    ("recurrent_block.linear_x.", "temporal_block.linear_x."),
    ("recurrent_block.linear_y.", "temporal_block.linear_y."),
    ("recurrent_block.linear_out.", "temporal_block.linear_out."),
    ("recurrent_block.conv_1d.b", "temporal_block.conv_1d.bias"),
    ("recurrent_block.rg_lru.a_param", "temporal_block.rg_lru.recurrent_param"),
    ("recurrent_block.rg_lru.input_gate.w", "temporal_block.rg_lru.input_gate_weight"),
    ("recurrent_block.rg_lru.input_gate.b", "temporal_block.rg_lru.input_gate_bias"),
    ("recurrent_block.rg_lru.a_gate.w", "temporal_block.rg_lru.recurrent_gate_weight"),
    ("recurrent_block.rg_lru.a_gate.b", "temporal_block.rg_lru.recurrent_gate_bias"),
    ("attention_block.proj_q.weight", "temporal_block.q_proj.weight"),
    ("attention_block.proj_k.weight", "temporal_block.k_proj.weight"),
    ("attention_block.proj_v.weight", "temporal_block.v_proj.weight"),
    ("attention_block.proj_final.weight", "temporal_block.o_proj.weight"),
    ("attention_block.proj_final.bias", "temporal_block.o_proj.bias"),
    ("mlp_block.ffw_down.weight", "mlp_block.down_proj.weight"),
    ("mlp_block.ffw_down.bias", "mlp_block.down_proj.bias"),
]
_BLOCK_NAME = re.compile(r"blocks\.(\d+)\.(.+)")


def is_official_layout(names) -> bool:
    """Return whether tensor names follow the official `recurrentgemma` layout."""
    return any(n == "embedder.input_embedding" or n.startswith("blocks.") for n in names)


def official_to_hf(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename and reshape an official `recurrentgemma` state dict to Hugging Face layout.

    Tensors that keep their shape are passed through uncopied. Raises KeyError
    naming the first tensor that belongs to neither layout.
    """
    out: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        if name == "embedder.input_embedding":
            out[EMBEDDING] = value
            continue
        if name == "final_norm.scale":
            out[FINAL_NORM] = value
            continue
        match = _BLOCK_NAME.fullmatch(name)
        if match is None:
            raise KeyError(f"tensor {name!r} is not part of an official RecurrentGemma state dict")
        prefix, rest = block_prefix(int(match.group(1))), match.group(2)
        if rest == "recurrent_block.conv_1d.w":  # [W, E] -> [E, 1, W]
            out[prefix + "temporal_block.conv_1d.weight"] = np.asarray(value).T[:, None, :]
        elif rest == "mlp_block.ffw_up.w":  # [2, D, M] -> gate, up [M, D]
            out[prefix + "mlp_block.gate_proj.weight"] = np.asarray(value)[0].T
            out[prefix + "mlp_block.up_proj.weight"] = np.asarray(value)[1].T
        elif rest == "mlp_block.ffw_up.b":  # [2, 1, 1, M] -> gate, up [M]
            out[prefix + "mlp_block.gate_proj.bias"] = np.asarray(value)[0, 0, 0]
            out[prefix + "mlp_block.up_proj.bias"] = np.asarray(value)[1, 0, 0]
        else:
            for old, new in _RENAMES:
                if rest == old or (old.endswith(".") and rest.startswith(old)):
                    out[prefix + new + rest[len(old):]] = value
                    break
            else:
                raise KeyError(f"tensor {name!r} is not part of an official RecurrentGemma "
                               "state dict")
    return out


def hf_to_official(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename and reshape Hugging Face layout tensors to the official state dict layout."""
    out: dict[str, np.ndarray] = {}
    pending_up: dict[str, dict[str, np.ndarray]] = {}
    for name, value in tensors.items():
        if name == TIED_LM_HEAD:
            continue
        if name == EMBEDDING:
            out["embedder.input_embedding"] = value
            continue
        if name == FINAL_NORM:
            out["final_norm.scale"] = value
            continue
        match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if match is None:
            raise KeyError(f"tensor {name!r} is not part of a Hugging Face RecurrentGemma model")
        prefix, rest = f"blocks.{match.group(1)}.", match.group(2)
        if rest == "temporal_block.conv_1d.weight":  # [E, 1, W] -> [W, E]
            out[prefix + "recurrent_block.conv_1d.w"] = np.ascontiguousarray(value[:, 0, :].T)
        elif rest.startswith(("mlp_block.gate_proj.", "mlp_block.up_proj.")):
            pending_up.setdefault(prefix, {})[rest] = np.asarray(value)
        else:
            for old, new in _RENAMES:
                if rest == new or (new.endswith(".") and rest.startswith(new)):
                    out[prefix + old + rest[len(new):]] = value
                    break
            else:
                raise KeyError(f"tensor {name!r} is not part of a Hugging Face RecurrentGemma "
                               "model")
    for prefix, parts in pending_up.items():
        try:
            gate_w, up_w = parts["mlp_block.gate_proj.weight"], parts["mlp_block.up_proj.weight"]
            gate_b, up_b = parts["mlp_block.gate_proj.bias"], parts["mlp_block.up_proj.bias"]
        except KeyError as e:
            raise KeyError(f"block {prefix} has no tensor {e.args[0]!r}") from None
        out[prefix + "mlp_block.ffw_up.w"] = np.stack([gate_w.T, up_w.T])
        out[prefix + "mlp_block.ffw_up.b"] = np.stack([gate_b, up_b])[:, None, None, :]
    return out
