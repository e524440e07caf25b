"""Read and write safetensors files with NumPy, bfloat16 included.

The `safetensors` package's NumPy API cannot represent bfloat16, and the
released RecurrentGemma weights are bfloat16, so rgref parses the format
itself: an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the raw little-endian data.
Tensors are memory-mapped, not copied; bfloat16 tensors come back as uint16
bits (see `rgref.dtypes`).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterable, Mapping

import numpy as np

from rgref.dtypes import BFLOAT16_BITS

# safetensors dtype name -> NumPy dtype of the stored bytes.
_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAMES = {
    np.dtype("<f8"): "F64",
    np.dtype("<f4"): "F32",
    np.dtype("<f2"): "F16",
    BFLOAT16_BITS: "BF16",
    np.dtype("<i8"): "I64",
    np.dtype("<i4"): "I32",
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A safetensors file that is truncated, corrupt or not a safetensors file."""


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """Return the parsed JSON header of a safetensors file and the data offset."""
    path = os.fspath(path)
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise SafetensorsError(f"{path}: file is {file_size} bytes, too short for a "
                                   "safetensors header; the file is truncated or not safetensors")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_MAX_HEADER_BYTES, file_size - 8):
            raise SafetensorsError(f"{path}: header length {header_len} exceeds the file size "
                                   f"{file_size}; the file is truncated or not safetensors")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: header is not valid JSON ({e}); "
                               "the file is corrupt or not safetensors") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    return header, 8 + header_len


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Memory-map every tensor of a safetensors file.

    Returns read-only arrays that view the file. Raises SafetensorsError when a
    tensor's byte range does not match its dtype and shape or lies outside the
    file, before any tensor is returned.
    """
    path = os.fspath(path)
    header, data_start = read_header(path)
    data_size = os.path.getsize(path) - data_start
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{path}: header entry for {name!r} lacks dtype, shape "
                                   "or data_offsets") from None
        if dtype_name not in _DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype "
                                   f"{dtype_name!r}; supported: {', '.join(_DTYPES)}")
        dtype = _DTYPES[dtype_name]
        shape = tuple(int(n) for n in shape)
        expected = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        if not 0 <= begin <= end or end - begin != expected:
            raise SafetensorsError(
                f"{path}: tensor {name!r} ({dtype_name} {list(shape)}) needs {expected} bytes "
                f"but its data_offsets are [{begin}, {end}]; the header is corrupt")
        if end > data_size:
            raise SafetensorsError(
                f"{path}: tensor {name!r} ends at byte {end} of the data section but the "
                f"data section is {data_size} bytes; the file is truncated")
        entries.append((name, dtype, shape, begin))

    tensors: dict[str, np.ndarray] = {}
    if data_size == 0:
        for name, dtype, shape, _ in entries:
            tensors[name] = np.zeros(shape, dtype)
        return tensors
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(data_size,))
    for name, dtype, shape, begin in entries:
        count = int(np.prod(shape, dtype=np.int64))
        nbytes = count * dtype.itemsize
        tensors[name] = data[begin:begin + nbytes].view(dtype).reshape(shape)
    return tensors


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors to a safetensors file, uint16 arrays as bfloat16.

    The header is padded to a multiple of 8 bytes as the reference writer does,
    so every tensor starts aligned and the file reads back with `safetensors`.
    """
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        array = np.asarray(tensors[name])
        dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        if dtype not in _NAMES:
            raise SafetensorsError(f"cannot save tensor {name!r} of dtype {array.dtype}; "
                                   "supported: float64, float32, float16, bfloat16 (uint16 bits),"
                                   " int64, int32")
        array = np.ascontiguousarray(array, dtype=dtype)
        header[name] = {"dtype": _NAMES[dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for array in arrays:
            f.write(array.tobytes())


def save_safetensors_streaming(path: str | os.PathLike,
                               layout: Mapping[str, tuple[np.dtype, tuple[int, ...]]],
                               read_chunks: Callable[[str], Iterable[np.ndarray]],
                               metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file one piece of a tensor at a time, uint16 as bfloat16.

    `layout` maps each tensor name, in the order written, to its dtype and shape,
    which the header needs before any data. `read_chunks(name)` yields arrays of
    that dtype whose bytes, concatenated, are the tensor in C order (for example
    blocks of rows). Only the chunk being written is held in memory, so a
    converter can write a model larger than RAM. Raises SafetensorsError when the
    chunks do not match the declared dtype or add up to another size.
    """
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, (dtype, shape) in layout.items():
        dtype = np.dtype(dtype)
        if dtype not in _NAMES:
            raise SafetensorsError(f"cannot save tensor {name!r} of dtype {dtype}; supported: "
                                   "float64, float32, float16, bfloat16 (uint16 bits), int64, "
                                   "int32, all little-endian")
        nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": _NAMES[dtype], "shape": [int(n) for n in shape],
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, (dtype, _) in layout.items():
            begin, end = header[name]["data_offsets"]
            written = 0
            for chunk in read_chunks(name):
                if chunk.dtype != np.dtype(dtype):
                    raise SafetensorsError(f"a chunk of tensor {name!r} has dtype {chunk.dtype}, "
                                           f"but the layout declares {np.dtype(dtype)}")
                chunk = np.ascontiguousarray(chunk)
                f.write(chunk)  # through the buffer protocol, without a copy
                written += chunk.nbytes
            if written != end - begin:
                raise SafetensorsError(f"the chunks of tensor {name!r} hold {written} bytes, but "
                                       f"its declared dtype and shape need {end - begin}")
