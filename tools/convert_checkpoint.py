"""Convert a RecurrentGemma checkpoint to a Hugging Face layout directory.

Accepted sources:
  - an official PyTorch checkpoint such as the Kaggle `2b.pt`, read without
    PyTorch (rgref.torch_checkpoint),
  - a safetensors file with official (`blocks.N...`) or Hugging Face names,
  - a Hugging Face directory (config.json plus model.safetensors or shards), to
    change the dtype or the shard size.

The output directory gets config.json, model.safetensors (or shards
model-0000N-of-0000M.safetensors with model.safetensors.index.json when the
weights exceed --max-shard-size) and the tokenizer files found beside the
source. A checkpoint without config.json has its structure inferred from the
tensor shapes (rgref.infer_config). Its attention window, logits soft cap and
embedding scale come from --preset, by default the preset whose structure
matches.

Tensors are memory-mapped and written in blocks of rows of at most 64 MiB, so
the memory this tool allocates is a few blocks whatever the model size.
Converting a 730 MB float32 checkpoint to bfloat16 peaked at 216 MiB of NumPy
and Python allocations (tracemalloc), on a 2-core x86-64 machine.

Examples:
  python tools/convert_checkpoint.py kaggle/2b-it/2b-it.pt out/recurrentgemma-2b-it
  python tools/convert_checkpoint.py 2b.pt out/2b --dtype bfloat16 --max-shard-size 2GB
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from typing import Iterator

import numpy as np

# Run from a checkout without `pip install -e .`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rgref import names  # noqa: E402
from rgref.config import PRESET_NAMES, Config, ConfigError  # noqa: E402
from rgref.dtypes import BFLOAT16_BITS, bfloat16_to_float32, float32_to_bfloat16  # noqa: E402
from rgref.infer_config import check_shapes, infer_config  # noqa: E402
from rgref.safetensors_file import (SafetensorsError, load_safetensors,  # noqa: E402
                                    save_safetensors_streaming)
from rgref.torch_checkpoint import CheckpointError, load_torch_state_dict  # noqa: E402

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
CHUNK_BYTES = 64 * 2**20
DTYPE_CHOICES = ("keep", "float32", "bfloat16")
# Output dtypes (little-endian, as safetensors stores them) and their config.json names.
DTYPE_NAMES = {np.dtype("<f4"): "float32", np.dtype("<f2"): "float16",
               np.dtype("<f8"): "float64", BFLOAT16_BITS.newbyteorder("<"): "bfloat16"}


class ConversionError(Exception):
    """A source or an option that the converter cannot use, with the reason in the message."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    """Parse a size such as `5GB`, `500MB`, `2GiB` or `1000000` into bytes.

    KB, MB and GB are powers of 1000 and KiB, MiB and GiB powers of 1024, as in
    Hugging Face's `max_shard_size`.
    """
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if match is None or match.group(2).upper() not in units:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}; expected a number of bytes "
                                         "with an optional unit such as 500MB or 2GiB")
    size = int(float(match.group(1)) * units[match.group(2).upper()])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}; it must be positive")
    return size


# ------------------------------------------------------------------ reading

def read_directory(directory: str) -> dict[str, np.ndarray]:
    """Memory-map the safetensors weights of a Hugging Face directory."""
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConversionError(f"{index_path} is not a valid safetensors index (it needs a "
                                  f"'weight_map' object): {e}") from None
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(load_safetensors(os.path.join(directory, shard)))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise ConversionError(f"{index_path} lists tensor {missing[0]} in "
                                  f"{weight_map[missing[0]]}, but that file does not contain "
                                  "it; download the shard again")
        return tensors
    single_path = os.path.join(directory, SINGLE_FILE)
    if os.path.isfile(single_path):
        return load_safetensors(single_path)
    raise ConversionError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def read_file(path: str) -> dict[str, np.ndarray]:
    """Memory-map a torch.save checkpoint or a safetensors file.

    A zip archive or a PyTorch file suffix means torch.save, whose loader also
    explains why it rejects the legacy pre-zip format. Anything else is read as
    safetensors.
    """
    with open(path, "rb") as f:
        start = f.read(4)
    if start == b"PK\x03\x04" or path.endswith(TORCH_SUFFIXES):
        return load_torch_state_dict(path)
    return load_safetensors(path)


def read_source(source: str, preset: str | None) -> tuple[dict[str, np.ndarray], Config]:
    """Read a source's tensors (renamed to Hugging Face names) and its config."""
    if os.path.isdir(source):
        tensors = read_directory(source)
        config_path = os.path.join(source, CONFIG_FILE)
    else:
        tensors = read_file(source)
        config_path = None
    log(f"read {len(tensors)} tensors from {source}")

    if names.is_official_layout(tensors):
        try:
            tensors = names.official_to_hf(tensors)
        except KeyError as e:
            raise ConversionError(f"{source}: {e.args[0]}") from None
    head = tensors.pop(names.TIED_LM_HEAD, None)
    if head is not None:
        log(f"dropped {names.TIED_LM_HEAD}: RecurrentGemma ties the output layer to the "
            "embedding")
        if names.EMBEDDING in tensors and head.shape != tensors[names.EMBEDDING].shape:
            raise ConversionError(f"{source}: {names.TIED_LM_HEAD} has shape {head.shape} but "
                                  f"the embedding has {tensors[names.EMBEDDING].shape}")

    if config_path is not None and os.path.isfile(config_path):
        if preset is not None:
            log(f"ignoring --preset {preset}: {config_path} sets every hyperparameter")
        config = Config.from_json_file(config_path)
        check_shapes(config, tensors)
        log(f"config from {config_path}")
    else:
        config = infer_config(tensors, preset)
        log(f"config inferred from the tensor shapes, with the attention window, soft cap and "
            f"embedding scale of preset {preset or 'matching the shapes'}: {config}")
    return tensors, config


# ------------------------------------------------------------------ writing

def output_dtype(array: np.ndarray, requested: str) -> np.dtype:
    """Return the little-endian dtype to write `array` as ("keep" keeps its own)."""
    if requested == "float32":
        return np.dtype("<f4")
    if requested == "bfloat16":
        return BFLOAT16_BITS.newbyteorder("<")
    return array.dtype.newbyteorder("<")


def is_bfloat16_dtype(dtype: np.dtype) -> bool:
    """Return whether `dtype` is bfloat16 bits, that is uint16 in either byte order."""
    return dtype.kind == "u" and dtype.itemsize == 2


def convert_block(block: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Convert a block of a tensor to the little-endian `dtype`, bfloat16 as uint16 bits."""
    if is_bfloat16_dtype(dtype) and not is_bfloat16_dtype(block.dtype):
        # NOTE: a float64 source is rounded to float32 and then to bfloat16; for a
        # few values that double rounding differs from rounding float64 directly.
        block = float32_to_bfloat16(block)
    elif dtype.kind == "f" and is_bfloat16_dtype(block.dtype):
        block = bfloat16_to_float32(block)
    return np.ascontiguousarray(block, dtype=dtype)


def converted_chunks(array: np.ndarray, dtype: np.dtype) -> Iterator[np.ndarray]:
    """Yield `array` converted to `dtype` in blocks of rows of at most CHUNK_BYTES.

    Slicing the first axis keeps C order, so the blocks concatenate to the tensor.
    The bound counts 4 bytes per value because conversions pass through float32.
    """
    if array.ndim == 0:
        yield convert_block(array.reshape(1), dtype)
        return
    row_bytes = max(1, int(np.prod(array.shape[1:], dtype=np.int64)) * 4)
    rows = max(1, CHUNK_BYTES // row_bytes)
    for start in range(0, array.shape[0], rows):
        yield convert_block(array[start:start + rows], dtype)


def plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Split tensor names, in order, into shards of at most `max_shard_bytes`.

    A tensor larger than the limit gets a shard of its own, as in Hugging Face.
    """
    shards: list[list[str]] = [[]]
    total = 0
    for name, nbytes in sizes.items():
        if shards[-1] and total + nbytes > max_shard_bytes:
            shards.append([])
            total = 0
        shards[-1].append(name)
        total += nbytes
    return shards


def write_weights(tensors: dict[str, np.ndarray], config: Config, output: str,
                  requested_dtype: str, max_shard_bytes: int) -> dict[str, np.dtype]:
    """Write the weights in `expected_shapes` order; return each tensor's written dtype."""
    layout = {name: (output_dtype(tensors[name], requested_dtype), tuple(tensors[name].shape))
              for name in names.expected_shapes(config)}
    sizes = {name: dtype.itemsize * int(np.prod(shape, dtype=np.int64))
             for name, (dtype, shape) in layout.items()}
    shards = plan_shards(sizes, max_shard_bytes)

    def read_chunks(name: str) -> Iterator[np.ndarray]:
        return converted_chunks(tensors[name], layout[name][0])

    weight_map = {}
    for i, shard in enumerate(shards):
        filename = (SINGLE_FILE if len(shards) == 1
                    else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
        path = os.path.join(output, filename)
        partial = path + ".partial"
        try:
            save_safetensors_streaming(partial, {name: layout[name] for name in shard},
                                       read_chunks)
        except BaseException:
            if os.path.exists(partial):
                os.remove(partial)
            raise
        os.replace(partial, path)
        weight_map.update({name: filename for name in shard})
        log(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB, {len(shard)} tensors)")
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        with open(os.path.join(output, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
    return {name: dtype for name, (dtype, _) in layout.items()}


def write_config(config: Config, dtypes: dict[str, np.dtype], output: str) -> None:
    hf_config = config.to_hf_config()
    distinct = {DTYPE_NAMES.get(dtype, str(dtype)) for dtype in dtypes.values()}
    if len(distinct) == 1:
        hf_config["torch_dtype"] = distinct.pop()
    with open(os.path.join(output, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2)
        f.write("\n")


def copy_tokenizer(source: str, tokenizer: str | None, output: str) -> None:
    if tokenizer is not None:
        paths = [tokenizer]
    else:
        directory = source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source))
        paths = [os.path.join(directory, name) for name in TOKENIZER_FILES]
        paths = [p for p in paths if os.path.isfile(p)]
        if not paths:
            log(f"no tokenizer file beside {source}; pass --tokenizer to copy tokenizer.model")
    for path in paths:
        target = os.path.join(output, os.path.basename(path))
        if os.path.exists(target) and os.path.samefile(path, target):
            continue  # the source sits in the output directory
        shutil.copyfile(path, target)
        log(f"copied {path} to {target}")


def remove_old_weights(output: str) -> None:
    """Delete the weight files a previous conversion wrote, so no stale shard or index stays."""
    for filename in os.listdir(output):
        if filename == INDEX_FILE or re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors", filename):
            os.remove(os.path.join(output, filename))
            log(f"removed {os.path.join(output, filename)}")


def check_output(source: str, output: str, overwrite: bool) -> None:
    if os.path.isdir(source) and os.path.isdir(output) and os.path.samefile(source, output):
        raise ConversionError(f"the output directory {output} is the source directory; the "
                              "source files are memory-mapped while the output is written, so "
                              "choose another directory")
    if os.path.isdir(output) and not overwrite:
        existing = [f for f in os.listdir(output) if f == CONFIG_FILE or f.endswith(".safetensors")]
        if existing:
            raise ConversionError(f"{output} already contains {existing[0]}; pass --overwrite "
                                  "to replace it or choose another directory")


def convert(source: str, output: str, preset: str | None = None, dtype: str = "keep",
            max_shard_bytes: int = 5 * 10**9, tokenizer: str | None = None,
            overwrite: bool = False) -> Config:
    """Convert `source` into a Hugging Face layout directory `output`; return the config."""
    if not os.path.exists(source):
        raise ConversionError(f"source {source} does not exist")
    if dtype not in DTYPE_CHOICES:
        raise ConversionError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")
    check_output(source, output, overwrite)
    tensors, config = read_source(source, preset)
    os.makedirs(output, exist_ok=True)
    if overwrite:
        remove_old_weights(output)
    dtypes = write_weights(tensors, config, output, dtype, max_shard_bytes)
    write_config(config, dtypes, output)
    copy_tokenizer(source, tokenizer, output)
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Convert a RecurrentGemma checkpoint (official .pt, safetensors file or "
                    "Hugging Face directory) to a Hugging Face layout directory.")
    parser.add_argument("source", help="a .pt file, a .safetensors file or a directory")
    parser.add_argument("output", help="the directory to write")
    parser.add_argument("--preset", choices=PRESET_NAMES,
                        help="preset that sets the attention window, logits soft cap and "
                             "embedding scale of a source without config.json (default: the "
                             "preset whose structure matches the tensor shapes)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="keep",
                        help="dtype of the written weights; keep (default) keeps each "
                             "tensor's own")
    parser.add_argument("--max-shard-size", type=parse_size, default=5 * 10**9,
                        help="largest safetensors file to write, e.g. 2GB or 500MiB; larger "
                             "weights are split into shards with an index (default: 5GB)")
    parser.add_argument("--tokenizer", help="tokenizer file to copy (default: the tokenizer "
                                            "files beside the source)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace config.json and the model*.safetensors weights (and "
                             "their index) in an existing directory")
    args = parser.parse_args(argv)
    try:
        convert(args.source, args.output, preset=args.preset, dtype=args.dtype,
                max_shard_bytes=args.max_shard_size, tokenizer=args.tokenizer,
                overwrite=args.overwrite)
    except (ConversionError, CheckpointError, SafetensorsError, ConfigError, OSError) as e:
        log(f"error: {e}")
        return 1
    log(f"done: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
