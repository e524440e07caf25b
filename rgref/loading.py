"""Load a RecurrentGemma checkpoint from disk into a `Model`.

Accepted layouts:

- A Hugging Face directory: `config.json` plus `model.safetensors`, or shards
  `model-0000N-of-0000M.safetensors` listed in `model.safetensors.index.json`.
- A safetensors file (or a directory holding one) whose tensors use the
  official `recurrentgemma` names (`blocks.N...`).
- An official PyTorch checkpoint (`2b.pt`, the Kaggle download), read without
  PyTorch by `rgref.torch_checkpoint`, or a directory holding one.

Without `config.json` the config is inferred from the tensor shapes; the
attention window, soft cap and embedding scale then come from the preset whose
shapes match (or the `preset` argument).

Tensors are memory-mapped and kept in their stored dtype (float32, float16 or
bfloat16); the model widens each weight when it uses it.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
from typing import Callable

import numpy as np

from rgref import names
from rgref.config import Config, ConfigError
from rgref.dtypes import float32_to_bfloat16, is_bfloat16
from rgref.infer_config import infer_config
from rgref.model import Model
from rgref.safetensors_file import SafetensorsError, load_safetensors
from rgref.torch_checkpoint import CheckpointError, load_torch_state_dict

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TORCH_SUFFIXES = (".pt", ".pth", ".ckpt")
WEIGHTS_DTYPES = ("bfloat16",)
# Elements converted at a time when narrowing weights: 64 MB of float32.
NARROW_CHUNK = 16 * 1024 * 1024
# Side of the square tiles in which a transposed weight is copied.
TRANSPOSE_TILE = 128


def load(path: str | os.PathLike, dtype=np.float32, preset: str | None = None,
         weights_dtype: str | None = None,
         progress: Callable[[int, int], None] | None = None) -> Model:
    """Load a checkpoint directory or weights file as a `Model`.

    Args:
      path: a Hugging Face layout directory, a `.safetensors` file (a shard
        listed in the `model.safetensors.index.json` beside it, or that index,
        loads every shard), an official PyTorch `.pt` file, or a directory
        holding one `.pt` file.
      dtype: compute dtype, np.float32 (default) or np.float64.
      preset: for a checkpoint without `config.json`, the preset that supplies
        the hyperparameters the shapes do not show (see `rgref.PRESET_NAMES`);
        by default the preset whose shapes match.

    Raises:
      CheckpointError: naming the file and the problem, e.g. a tensor with the
        wrong shape, a missing shard, or a config.json that contradicts the
        weights.
      ConfigError: a preset given for a checkpoint that has a config.json.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint path {path} does not exist")
    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    has_config = os.path.isfile(os.path.join(directory, CONFIG_FILE))
    if has_config and preset is not None:
        raise ConfigError(f"preset {preset!r} applies only to a checkpoint without "
                          f"{CONFIG_FILE}, and {os.path.join(directory, CONFIG_FILE)} sets the "
                          "hyperparameters; pass no preset")

    if os.path.isdir(path):
        weights_file = _single_torch_file(path, has_config)
    else:
        weights_file = _weights_file(path, directory)
    if weights_file is None:
        tensors, origin = _read_directory(directory)
    elif weights_file.endswith(TORCH_SUFFIXES):
        tensors, origin = load_torch_state_dict(weights_file), {}
    else:
        tensors, origin = _read_safetensors(weights_file), {}

    if names.is_official_layout(tensors):
        try:
            tensors = names.official_to_hf(tensors)
        except KeyError as e:
            raise CheckpointError(f"{path}: {e.args[0]}") from None
    tensors = _drop_tied_head(tensors, path)
    if has_config:
        config = _read_config(os.path.join(directory, CONFIG_FILE))
    else:
        try:
            config = infer_config(tensors, preset)
        except ConfigError as e:
            raise CheckpointError(f"{path} has no {CONFIG_FILE} beside it and its config "
                                  f"cannot be inferred: {e}") from None
    check_tensors(config, tensors, origin, default_file=weights_file or path)
    if weights_dtype is not None:
        if weights_dtype not in WEIGHTS_DTYPES:
            raise ValueError(f"weights_dtype must be None or one of {WEIGHTS_DTYPES}, "
                             f"got {weights_dtype!r}")
        tensors = narrow_to_bfloat16(tensors, progress)
    else:
        # The official MLP up projection is stored [2, D, M], so its gate and up weights
        # arrive as transposed views, which the kernels cannot read in place.
        tensors = {name: _contiguous(value) for name, value in tensors.items()}
    return Model(config, tensors, dtype=dtype)


def narrow_to_bfloat16(tensors: dict[str, np.ndarray],
                       progress: Callable[[int, int], None] | None = None
                       ) -> dict[str, np.ndarray]:
    """Round every float tensor to bfloat16 (uint16 bits) in memory.

    Each memory-mapped source chunk is released from the process right after
    it is converted, so peak memory is the bfloat16 copy plus one chunk, not
    both full copies. A transposed source (the official MLP up projection) is
    first copied whole, which adds one tensor to the peak.
    """
    total = sum(v.nbytes for v in tensors.values() if not is_bfloat16(v))
    done = 0
    narrowed = {}
    for name, value in tensors.items():
        value = _contiguous(value)
        if is_bfloat16(value):
            narrowed[name] = value
            continue
        out = np.empty(value.shape, np.uint16)
        flat_out = out.reshape(-1)
        flat_in = value.reshape(-1)
        for start in range(0, flat_in.size, NARROW_CHUNK):
            chunk = flat_in[start:start + NARROW_CHUNK]
            flat_out[start:start + chunk.size] = float32_to_bfloat16(chunk.astype(np.float32))
            _release_pages(chunk)
            done += chunk.nbytes
            if progress is not None:
                progress(done, total)
        narrowed[name] = out
    return narrowed


def _contiguous(value: np.ndarray) -> np.ndarray:
    """Return `value` itself if C-contiguous, else a C-contiguous copy.

    A 2-D view (a transpose) is copied in square tiles: NumPy copied a transposed
    2560 x 7680 bfloat16 matrix in 38 ms that way and in 290 ms whole (2-core AMD
    EPYC VM). The memory-mapped pages under the
    view are then released, so the process does not keep both copies.
    """
    if value.flags.c_contiguous:
        return value
    if value.ndim != 2:
        return np.ascontiguousarray(value)
    copy = np.empty(value.shape, value.dtype)
    rows, columns = value.shape
    for i in range(0, rows, TRANSPOSE_TILE):
        for j in range(0, columns, TRANSPOSE_TILE):
            copy[i:i + TRANSPOSE_TILE, j:j + TRANSPOSE_TILE] = \
                value[i:i + TRANSPOSE_TILE, j:j + TRANSPOSE_TILE]
    _release_pages(value)
    return copy


def _release_pages(view: np.ndarray) -> None:
    """Drop the memory-mapped file pages under `view` from this process (re-read if used)."""
    # Views of a memmap are memmaps too; the mapping itself is the outermost array.
    root = view
    while isinstance(root.base, np.ndarray):
        root = root.base
    mapping = getattr(root, "_mmap", None)
    if not isinstance(root, np.memmap) or mapping is None or not hasattr(mapping, "madvise"):
        return
    # np.memmap maps from `offset` rounded down to the allocation granularity.
    mapping_start = root.ctypes.data - root.offset % mmap.ALLOCATIONGRANULARITY
    # The bytes from the lowest to the highest element, also for a transposed view.
    extents = [(n - 1) * stride for n, stride in zip(view.shape, view.strides)]
    begin = view.ctypes.data + sum(e for e in extents if e < 0) - mapping_start
    end = view.ctypes.data + sum(e for e in extents if e > 0) + view.itemsize - mapping_start
    begin -= begin % mmap.PAGESIZE
    end = min(end - end % mmap.PAGESIZE, len(mapping))
    if end > begin:
        mapping.madvise(mmap.MADV_DONTNEED, begin, end - begin)


def _weights_file(path: str, directory: str) -> str | None:
    """Return the file to read for a file path, or None to read the whole directory.

    A shard or the index of a sharded checkpoint loads the whole checkpoint,
    because one shard alone lacks most of the model's tensors.
    """
    name = os.path.basename(path)
    if name == INDEX_FILE:
        return None
    if name.endswith(".safetensors"):
        return None if name in _listed_shards(os.path.join(directory, INDEX_FILE)) else path
    if name.endswith(TORCH_SUFFIXES):
        return path
    raise CheckpointError(f"{path} is not a weights file; pass a .safetensors file, a PyTorch "
                          f"{'/'.join(TORCH_SUFFIXES)} file or the checkpoint directory")


def _listed_shards(index_path: str) -> set[str]:
    """Return the shard file names that a safetensors index lists (none if it is unreadable)."""
    try:
        return set(_read_weight_map(index_path).values())
    except CheckpointError:
        return set()


def _read_weight_map(index_path: str) -> dict[str, str]:
    """Return the tensor-to-shard map of a safetensors index file."""
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path} is not a valid safetensors index "
                              f"(needs a 'weight_map' object): {e}") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path} is not a valid safetensors index: its "
                              f"'weight_map' is a {type(weight_map).__name__}, not an object")
    return weight_map


def _single_torch_file(directory: str, has_config: bool) -> str | None:
    """The one `.pt` file of a Kaggle-style directory, or None for a safetensors one."""
    if has_config or any(f.endswith(".safetensors") for f in os.listdir(directory)):
        return None
    found = sorted(f for f in os.listdir(directory) if f.endswith(TORCH_SUFFIXES))
    if len(found) > 1:
        raise CheckpointError(f"{directory} holds several PyTorch checkpoints "
                              f"({', '.join(found)}); pass the one to load as the path")
    if not found:
        raise CheckpointError(f"{directory} has no {CONFIG_FILE}, no .safetensors file and no "
                              ".pt file; is it a RecurrentGemma checkpoint directory?")
    return os.path.join(directory, found[0])


def _read_config(config_path: str) -> Config:
    try:
        return Config.from_json_file(config_path)
    except (ConfigError, OSError) as e:
        raise CheckpointError(str(e)) from None


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    try:
        return load_safetensors(path)
    except (SafetensorsError, OSError) as e:
        raise CheckpointError(str(e)) from None


def _read_directory(directory: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read every tensor of a directory; also return which file each came from."""
    index_path = os.path.join(directory, INDEX_FILE)
    single_path = os.path.join(directory, SINGLE_FILE)
    if os.path.isfile(index_path):
        weight_map = _read_weight_map(index_path)
        tensors: dict[str, np.ndarray] = {}
        origin: dict[str, str] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = os.path.join(directory, shard)
            if not os.path.isfile(shard_path):
                listed = [n for n, s in weight_map.items() if s == shard]
                raise CheckpointError(f"{index_path} lists shard {shard} (for {listed[0]} and "
                                      f"{len(listed) - 1} more tensors) but {shard_path} does "
                                      "not exist; download the missing shard")
            for name, value in _read_safetensors(shard_path).items():
                tensors[name] = value
                origin[name] = shard_path
        for name, shard in weight_map.items():
            if name not in tensors:
                raise CheckpointError(f"{index_path} maps tensor {name} to {shard}, but that "
                                      "file does not contain it")
        return tensors, origin
    if os.path.isfile(single_path):
        tensors = _read_safetensors(single_path)
        return tensors, {name: single_path for name in tensors}
    candidates = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if len(candidates) == 1:
        only = os.path.join(directory, candidates[0])
        tensors = _read_safetensors(only)
        return tensors, {name: only for name in tensors}
    raise CheckpointError(f"{directory} has no {SINGLE_FILE} or {INDEX_FILE}"
                          + (f" (found {', '.join(candidates)}; pass one file as the path)"
                             if candidates else ""))


def _drop_tied_head(tensors: dict[str, np.ndarray], path: str) -> dict[str, np.ndarray]:
    """Drop an `lm_head.weight` that some exports write: the output layer is tied."""
    head = tensors.pop(names.TIED_LM_HEAD, None)
    if head is not None and names.EMBEDDING in tensors:
        if head.shape != tensors[names.EMBEDDING].shape:
            raise CheckpointError(f"{path}: {names.TIED_LM_HEAD} has shape {head.shape} but "
                                  f"the embedding has {tensors[names.EMBEDDING].shape}; "
                                  "RecurrentGemma ties the output layer to the embedding")
        logger.debug("ignoring %s: the output layer is tied to the embedding",
                     names.TIED_LM_HEAD)
    return tensors


def check_tensors(config: Config, tensors: dict[str, np.ndarray], origin: dict[str, str],
                  default_file: str) -> None:
    """Raise CheckpointError naming the first missing, unexpected or misshapen tensor."""
    expected = names.expected_shapes(config)
    for name, shape in expected.items():
        if name not in tensors:
            raise CheckpointError(f"{default_file}: tensor {name} (shape {shape}) is missing; "
                                  "is this a RecurrentGemma checkpoint matching its "
                                  "config.json?")
    for name, value in tensors.items():
        where = origin.get(name, default_file)
        if name not in expected:
            raise CheckpointError(f"{where}: unexpected tensor {name} with shape "
                                  f"{tuple(value.shape)}; the config.json describes a "
                                  f"different model")
        if tuple(value.shape) != expected[name]:
            raise CheckpointError(f"{where}: tensor {name} has shape {tuple(value.shape)}, "
                                  f"expected {expected[name]} from config.json")
        if value.dtype not in (np.float32, np.float16, np.float64, np.uint16):
            raise CheckpointError(f"{where}: tensor {name} has dtype {value.dtype}; expected "
                                  "float32, float16 or bfloat16")
