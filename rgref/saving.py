"""Save a model as a checkpoint directory that `rgref.load` (and transformers) can read."""

from __future__ import annotations

import json
import os

import numpy as np

from rgref import names
from rgref.dtypes import bfloat16_to_float32, float32_to_bfloat16, is_bfloat16
from rgref.loading import CONFIG_FILE, INDEX_FILE, SINGLE_FILE
from rgref.model import Model
from rgref.safetensors_file import save_safetensors

LAYOUTS = ("huggingface", "official")


def save(model: Model, directory: str | os.PathLike, layout: str = "huggingface",
         weights_dtype: str | None = None, max_shard_bytes: int | None = None) -> None:
    """Write `config.json` and the weights of `model` into `directory`.

    Args:
      layout: "huggingface" (`model.embed_tokens.weight`, ...) or "official"
        (`embedder.input_embedding`, `blocks.N...` as in recurrentgemma's
        PyTorch state dict), both as safetensors.
      weights_dtype: None keeps each tensor's dtype; "float32" or "bfloat16"
        converts every tensor.
      max_shard_bytes: split the weights into `model-0000N-of-0000M.safetensors`
        shards of at most this size with a `model.safetensors.index.json`, as
        Hugging Face does for large models.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if weights_dtype not in (None, "float32", "bfloat16"):
        raise ValueError(f"weights_dtype must be None, 'float32' or 'bfloat16', "
                         f"got {weights_dtype!r}")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(model.config.to_hf_config(), f, indent=2)
        f.write("\n")

    tensors = {name: _convert(value, weights_dtype) for name, value in model.params.items()}
    if layout == "official":
        tensors = names.hf_to_official(tensors)

    if max_shard_bytes is None:
        save_safetensors(os.path.join(directory, SINGLE_FILE), tensors)
        return
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = np.asarray(tensors[name]).nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(os.path.join(directory, filename), shard)
        weight_map.update({name: filename for name in shard})
    total = sum(np.asarray(v).nbytes for v in tensors.values())
    with open(os.path.join(directory, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        f.write("\n")


def _convert(value: np.ndarray, weights_dtype: str | None) -> np.ndarray:
    if weights_dtype is None:
        return value
    if weights_dtype == "bfloat16":
        return value if is_bfloat16(value) else float32_to_bfloat16(value)
    if is_bfloat16(value):
        return bfloat16_to_float32(value)
    return value.astype(np.float32)
