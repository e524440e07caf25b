"""Read PyTorch `torch.save` checkpoints without PyTorch, memory-mapped and safely.

The official RecurrentGemma PyTorch weights (`2b.pt`, `2b-it.pt`) are a state
dict written by `torch.save`. Since PyTorch 1.6 that is a zip archive whose
entries all sit in one top-level directory (`<archive>/`, named after the file):

| entry                    | content                                                |
|--------------------------|--------------------------------------------------------|
| `<archive>/data.pkl`     | pickle of the state dict; tensors refer to storages    |
| `<archive>/data/<key>`   | raw bytes of storage `<key>`, stored uncompressed      |
| `<archive>/byteorder`    | `little` or `big`; files without it are little-endian  |
| `version`, `.format_version`, `.storage_alignment`, `.data/serialization_id` | unused here |

In `data.pkl` each tensor is a call
`torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
backward_hooks)` and each storage is the persistent id
`('storage', torch.FloatStorage, key, location, numel)`; the storage class gives
the element dtype, and `numel` counts elements, not bytes.

Unpickling can call any importable function, so a checkpoint from the internet
could run code through `pickle.load`. This module unpickles with an allowlist:
only the opcodes and globals that a plain tensor state dict needs (listed in
`_ALLOWED_OPCODES` and `_ALLOWED_GLOBALS`) are accepted. The whole pickle is
scanned before unpickling starts, so an opcode or a `GLOBAL` outside the
allowlist is rejected before any opcode runs. A global built on the stack
(`STACK_GLOBAL`) is checked when it is resolved, before it can be called. The
allowed globals are replaced by stand-ins defined here that only record
arguments: nothing from PyTorch is imported or called.

Tensors are not copied. `torch.save` stores every entry uncompressed, so each
storage is a byte range of the file, and the returned arrays view one read-only
`np.memmap` of it. The exception is a file written on a machine of the other
byte order, which is byte-swapped into memory. bfloat16 tensors come back as uint16 bits (see
`rgref.dtypes`).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import pickletools
import struct
import sys
import zipfile

import numpy as np

from rgref.dtypes import BFLOAT16_BITS


class CheckpointError(ValueError):
    """A PyTorch checkpoint that is truncated, corrupt or not a plain tensor state dict."""


class UnsafePickleError(CheckpointError):
    """A checkpoint whose pickle uses a global or opcode that a tensor state dict never needs."""


# ------------------------------------------------------------------ allowlists

# Opcodes that build a state dict of tensors, as written by torch.save (pickle
# protocol 2 by default) or with a higher protocol. Left out on purpose: INST, OBJ,
# NEWOBJ and NEWOBJ_EX create instances of arbitrary classes; EXT1/2/4 import
# globals from the copyreg registry; PERSID, NEXT_BUFFER, READONLY_BUFFER and the
# set opcodes never occur in a torch.save state dict.
_ALLOWED_OPCODES = frozenset({
    "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP",
    "NONE", "NEWTRUE", "NEWFALSE",
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
    "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
    "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8",
    "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
    "EMPTY_LIST", "LIST", "APPEND", "APPENDS",
    "EMPTY_DICT", "DICT", "SETITEM", "SETITEMS",
    "PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE", "GET", "BINGET", "LONG_BINGET",
    "GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD", "BINPERSID",
})
_ALLOWED_CODES = frozenset(ord(op.code) for op in pickletools.opcodes
                           if op.name in _ALLOWED_OPCODES)

# torch storage class -> dtype of its elements as stored in a little-endian file.
_STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": BFLOAT16_BITS.newbyteorder("<"),
}
# Storage classes a state dict may contain but rgref does not load, with their
# torch dtype for the error message. No RecurrentGemma parameter has these dtypes.
_UNSUPPORTED_STORAGES = {
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
    "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128",
    "QInt8Storage": "qint8", "QUInt8Storage": "quint8", "QInt32Storage": "qint32",
    "QUInt4x2Storage": "quint4x2", "QUInt2x4Storage": "quint2x4",
}

_ALLOWED_GLOBALS = frozenset(
    {("collections", "OrderedDict"),
     ("torch._utils", "_rebuild_tensor_v2"),
     ("torch._utils", "_rebuild_parameter")}
    | {("torch", name) for name in (*_STORAGE_DTYPES, *_UNSUPPORTED_STORAGES)})

# A state dict pickle takes about 100 bytes per tensor, so a limit this far above
# any real one only stops a crafted archive from inflating an entry into all of
# memory.
_MAX_PICKLE_BYTES = 256 * 1024 * 1024

# Zip local file header: 30 fixed bytes, then the file name and the extra field.
_LOCAL_HEADER = struct.Struct("<4s22xHH")
_LOCAL_HEADER_SIGNATURE = b"PK\x03\x04"
_EMPTY_ZIP_SIGNATURE = b"PK\x05\x06"
# The legacy (pre-zip) torch.save format starts with a protocol 2 pickle of the
# magic number 0x1950a86a20f9469cfc6c.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_NATIVE_BYTE_ORDER = "<" if sys.byteorder == "little" else ">"


# ------------------------------------------------- records built by unpickling

@dataclasses.dataclass(frozen=True)
class _StorageType:
    """Stand-in for a torch storage class such as `torch.FloatStorage`."""
    name: str


@dataclasses.dataclass(frozen=True)
class _Storage:
    """A storage named by a persistent id: its class, archive key and element count."""
    type_name: str
    key: str
    numel: int


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """The arguments of one `_rebuild_tensor_v2` call, in elements of the storage."""
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _is_int_tuple(value) -> bool:
    return isinstance(value, tuple) and all(type(n) is int for n in value)


class _StateDictUnpickler(pickle._Unpickler):
    """Unpickle a torch.save state dict, resolving only the allowlisted globals.

    This subclasses the Python implementation of the unpickler (`pickle._Unpickler`)
    because, unlike the C one, it lets a subclass replace its opcode table. The
    `dispatch` table below has no entry for an opcode outside `_ALLOWED_OPCODES`,
    and REDUCE and BUILD are restricted further.
    """

    def __init__(self, data: bytes, path: str, entry: str):
        super().__init__(io.BytesIO(data))
        self._path = path
        self._entry = entry
        # find_class returns these very objects, so REDUCE can check identity.
        rebuild_tensor, rebuild_parameter = self._rebuild_tensor_v2, self._rebuild_parameter
        self._callables = (collections.OrderedDict, rebuild_tensor, rebuild_parameter)
        self._globals = {
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
        }
        for module, name in _ALLOWED_GLOBALS:
            if module == "torch":
                self._globals[module, name] = _StorageType(name)

    def _corrupt(self, reason: str) -> CheckpointError:
        return CheckpointError(f"{self._path}: {self._entry} is not a valid torch.save state "
                               f"dict because {reason}; the file is corrupt or was not written "
                               "by torch.save")

    def find_class(self, module: str, name: str):
        try:
            return self._globals[module, name]
        except KeyError:
            raise UnsafePickleError(_forbidden_global_message(self._path, self._entry,
                                                              module, name)) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise self._corrupt(f"it has the persistent id {pid!r}, expected "
                                "('storage', type, key, location, numel)")
        _, storage_type, key, location, numel = pid
        if (not isinstance(storage_type, _StorageType) or not isinstance(key, str)
                or not isinstance(location, str) or type(numel) is not int or numel < 0):
            raise self._corrupt(f"it has the malformed storage id {pid!r}")
        # `location` is the device the tensor was saved from ("cpu", "cuda:0"). The
        # bytes in the archive do not depend on it, so it is ignored.
        return _Storage(storage_type.name, key, numel)

    def _rebuild_tensor_v2(self, storage, offset, shape, stride, requires_grad,
                           backward_hooks, metadata=None) -> _Tensor:
        if (not isinstance(storage, _Storage) or type(offset) is not int
                or not _is_int_tuple(shape) or not _is_int_tuple(stride)
                or len(shape) != len(stride) or any(n < 0 for n in shape)
                or not isinstance(requires_grad, bool)):
            raise self._corrupt("a _rebuild_tensor_v2 call has malformed arguments")
        if backward_hooks:
            raise self._corrupt("a tensor has backward hooks, which torch.save never writes")
        if metadata:
            # torch writes metadata only for the lazy conjugate and negative bits.
            raise CheckpointError(
                f"{self._path}: a tensor in {self._entry} carries the tensor metadata "
                f"{metadata!r}, which rgref does not apply; re-save the state dict after "
                "calling tensor.resolve_conj().resolve_neg() on each tensor")
        return _Tensor(storage, offset, shape, stride)

    def _rebuild_parameter(self, data, requires_grad, backward_hooks) -> _Tensor:
        if not isinstance(data, _Tensor) or backward_hooks:
            raise self._corrupt("a _rebuild_parameter call has malformed arguments")
        return data

    def load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if not any(func is allowed for allowed in self._callables):
            raise UnsafePickleError(
                f"{self._path}: {self._entry} calls a {type(func).__name__} object, which is "
                "not one of the functions a tensor state dict calls, so rgref stopped "
                "unpickling it; if you trust the file, load it with PyTorch and save its "
                "state dict again")
        if not isinstance(args, tuple):
            raise self._corrupt("a REDUCE opcode has arguments that are not a tuple")
        self.stack[-1] = func(*args)

    def load_build(self):
        # Module.state_dict() attaches `_metadata` (the module versions) to its
        # OrderedDict, which pickle restores with BUILD. rgref needs none of it, so
        # the state is dropped. BUILD on anything else could set attributes of the
        # stand-ins, so it is rejected.
        state = self.stack.pop()
        if type(self.stack[-1]) is not collections.OrderedDict or not isinstance(state, dict):
            raise UnsafePickleError(
                f"{self._path}: {self._entry} sets the state of a "
                f"{type(self.stack[-1]).__name__} object, which a tensor state dict never "
                "does, so rgref stopped unpickling it; if you trust the file, load it with "
                "PyTorch and save its state dict again")

    dispatch = {code: handler for code, handler in pickle._Unpickler.dispatch.items()
                if code in _ALLOWED_CODES}
    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.BUILD[0]] = load_build


def _forbidden_global_message(path: str, entry: str, module: str, name: str) -> str:
    return (f"{path}: {entry} imports {module}.{name}, which a plain tensor state dict never "
            "uses, so rgref rejected the file without importing it (unpickling a file can run "
            "arbitrary code); if you trust the file, load it with PyTorch and save only its "
            "tensors with torch.save(state_dict, path)")


def _scan_pickle(data: bytes, path: str, entry: str) -> None:
    """Raise UnsafePickleError if the pickle has an opcode or GLOBAL outside the allowlist.

    Runs nothing: `pickletools.genops` only decodes the opcode stream.
    """
    try:
        opcodes = list(pickletools.genops(data))
    except ValueError as e:
        raise CheckpointError(f"{path}: {entry} is not a valid pickle ({e}); the file is "
                              "corrupt, download or save it again") from None
    for opcode, argument, position in opcodes:
        if opcode.name not in _ALLOWED_OPCODES:
            raise UnsafePickleError(
                f"{path}: {entry} uses the pickle opcode {opcode.name} at byte {position}, "
                "which a plain tensor state dict never uses, so rgref rejected the file "
                "without unpickling it (unpickling can run arbitrary code); if you trust "
                "the file, load it with PyTorch and save only its tensors again")
        if opcode.name == "GLOBAL":
            module, _, name = argument.partition(" ")
            if (module, name) not in _ALLOWED_GLOBALS:
                raise UnsafePickleError(_forbidden_global_message(path, entry, module, name))


def _unpickle_state_dict(data: bytes, path: str, entry: str) -> dict[str, _Tensor]:
    """Unpickle `data.pkl` into tensor records, after checking it against the allowlists."""
    _scan_pickle(data, path, entry)
    unpickler = _StateDictUnpickler(data, path, entry)
    try:
        result = unpickler.load()
    except CheckpointError:
        raise
    except Exception as e:  # a malformed pickle can fail in many ways inside pickle.py
        raise CheckpointError(f"{path}: unpickling {entry} failed ({type(e).__name__}: {e}); "
                              "the file is corrupt, download or save it again") from None

    if not isinstance(result, dict):
        raise CheckpointError(f"{path}: {entry} contains a {type(result).__name__}, not a state "
                              "dict; save the model with torch.save(model.state_dict(), path)")
    for name, value in result.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{path}: the state dict has the key {name!r}, which is not a "
                                  "string; rgref reads state dicts of named tensors")
        if not isinstance(value, _Tensor):
            raise CheckpointError(
                f"{path}: state dict entry {name!r} is a {type(value).__name__}, not a tensor; "
                "rgref reads a flat state dict such as torch.save(model.state_dict(), path)")
    return result


# ------------------------------------------------------------------ the archive

def _check_signature(path: str) -> None:
    """Raise CheckpointError unless the file starts like a zip archive."""
    with open(path, "rb") as f:
        start = f.read(len(_LEGACY_MAGIC))
    if start.startswith((_LOCAL_HEADER_SIGNATURE, _EMPTY_ZIP_SIGNATURE)):
        return
    if start == _LEGACY_MAGIC:
        raise CheckpointError(
            f"{path} uses the legacy torch.save format (PyTorch before 1.6, or "
            "_use_new_zipfile_serialization=False), which rgref does not read; re-save it "
            "with PyTorch: torch.save(torch.load(path, weights_only=True), new_path)")
    raise CheckpointError(f"{path} is not a torch.save zip archive (it starts with "
                          f"{start[:8]!r}); pass a checkpoint written by torch.save")


def _archive_prefix(archive: zipfile.ZipFile, path: str) -> str:
    """Return the top-level directory of the archive, with a trailing slash.

    PyTorch reads the name of the first entry up to its first slash, so this does too.
    """
    names = archive.namelist()
    if not names or "/" not in names[0]:
        raise CheckpointError(f"{path}: the zip archive has no top-level directory with a "
                              "data.pkl entry, so it was not written by torch.save")
    prefix = names[0].split("/", 1)[0] + "/"
    if prefix + "data.pkl" not in names:
        hint = ("it looks like a TorchScript archive (torch.jit.save); save the state dict "
                "with torch.save instead" if prefix + "constants.pkl" in names
                else "the file was not written by torch.save or is corrupt")
        raise CheckpointError(f"{path}: the zip archive has no entry {prefix}data.pkl; {hint}")
    return prefix


def _read_small_entry(archive: zipfile.ZipFile, path: str, name: str) -> bytes:
    info = archive.getinfo(name)
    if info.file_size > _MAX_PICKLE_BYTES:
        raise CheckpointError(f"{path}: entry {name} is {info.file_size} bytes, more than the "
                              f"{_MAX_PICKLE_BYTES} bytes rgref reads; the file is corrupt")
    try:
        return archive.read(info)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"{path}: reading entry {name} failed ({e}); the file is "
                              "truncated or corrupt, download it again") from None


def _read_byteorder(archive: zipfile.ZipFile, path: str, prefix: str) -> str:
    name = prefix + "byteorder"
    if name not in archive.NameToInfo:
        return "little"  # what PyTorch assumes for files written before the record existed
    value = _read_small_entry(archive, path, name)
    if value not in (b"little", b"big"):
        raise CheckpointError(f"{path}: entry {name} is {value[:16]!r}, expected b'little' or "
                              "b'big'; the file is corrupt")
    return value.decode()


def _entry_data_offset(f, info: zipfile.ZipInfo, path: str, file_size: int) -> int:
    """Return the file offset of a stored entry's bytes, read from its local header.

    The central directory gives the local header's offset, and the data follows
    the 30-byte header, the name and the extra field. torch.save sizes the extra
    field to pad the data to a 64-byte boundary, so its length must be read from
    the local header.
    """
    if info.compress_type != zipfile.ZIP_STORED:
        raise CheckpointError(
            f"{path}: entry {info.filename} is compressed (zip method "
            f"{info.compress_type}), so it cannot be memory-mapped; torch.save never "
            "compresses entries, so re-save the checkpoint with torch.save rather than "
            "re-zipping it")
    if info.flag_bits & 0x1:
        raise CheckpointError(f"{path}: entry {info.filename} is encrypted; re-save the "
                              "checkpoint with torch.save")
    f.seek(info.header_offset)
    header = f.read(_LOCAL_HEADER.size)
    if len(header) < _LOCAL_HEADER.size:
        raise CheckpointError(f"{path}: the local header of entry {info.filename} lies past the "
                              "end of the file; the file is truncated, download it again")
    signature, name_length, extra_length = _LOCAL_HEADER.unpack(header)
    if signature != _LOCAL_HEADER_SIGNATURE:
        raise CheckpointError(f"{path}: entry {info.filename} has no local header at byte "
                              f"{info.header_offset}; the file is corrupt, download it again")
    offset = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
    if offset + info.file_size > file_size:
        raise CheckpointError(
            f"{path}: entry {info.filename} ends at byte {offset + info.file_size} but the file "
            f"is {file_size} bytes; the file is truncated, download it again")
    return offset


def _is_c_contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = 1
    for n, s in zip(reversed(shape), reversed(stride)):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


def _tensor_view(storage: np.ndarray, tensor: _Tensor, path: str, name: str) -> np.ndarray:
    """View one tensor in its storage (a 1-D array of storage elements) without copying.

    A contiguous tensor is a slice of the memory map reshaped, so it is an
    `np.memmap`. A non-contiguous one (a transpose, a column slice) comes back as a
    read-only strided view of the same memory, as torch itself would rebuild it.
    """
    shape, stride, offset = tensor.shape, tensor.stride, tensor.offset
    count = int(np.prod(shape, dtype=np.int64))
    if count == 0:
        return storage[:0].reshape(shape)
    last = offset + sum((n - 1) * s for n, s in zip(shape, stride))
    if offset < 0 or any(s < 0 for s in stride) or last >= storage.shape[0]:
        raise CheckpointError(
            f"{path}: tensor {name!r} (shape {list(shape)}, stride {list(stride)}, storage "
            f"offset {offset}) reaches element {last} of storage {tensor.storage.key}, which "
            f"holds {storage.shape[0]} elements; the file is corrupt")
    if _is_c_contiguous(shape, stride):
        return storage[offset:offset + count].reshape(shape)
    itemsize = storage.dtype.itemsize
    return np.lib.stride_tricks.as_strided(
        storage[offset:], shape=shape, strides=[s * itemsize for s in stride], writeable=False)


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a state dict saved by `torch.save` into read-only NumPy arrays, without PyTorch.

    Returns the tensors in file order. Arrays view a memory map of the file, so
    loading reads only the pickle; a non-contiguous tensor is a strided view.
    float32, float16 and float64 tensors keep their dtype and bfloat16 tensors come
    back as uint16 bits, all in native byte order. Raises
    UnsafePickleError (a CheckpointError) before running anything if the pickle
    needs a global or opcode that a plain tensor state dict does not, and
    CheckpointError for any other unreadable or unsupported file.

    NOTE: the CRC-32 of the tensor entries is not checked, because that would read
    the whole file; a flipped bit in tensor data goes unnoticed.
    """
    path = os.fspath(path)
    try:
        file_size = os.path.getsize(path)
        _check_signature(path)
        archive = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} not found") from None
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"{path} is not a readable zip archive ({e}); the file is "
                              "truncated or corrupt, download it again") from None

    with archive:
        prefix = _archive_prefix(archive, path)
        pickle_entry = prefix + "data.pkl"
        records = _unpickle_state_dict(_read_small_entry(archive, path, pickle_entry), path,
                                       pickle_entry)
        byte_order = "<" if _read_byteorder(archive, path, prefix) == "little" else ">"

        # Locate each storage entry and check its size before mapping anything.
        storages: dict[str, tuple[np.dtype, int, _Storage]] = {}
        with open(path, "rb") as f:
            for name, tensor in records.items():
                storage = tensor.storage
                if storage.type_name in _UNSUPPORTED_STORAGES:
                    raise CheckpointError(
                        f"{path}: tensor {name!r} has dtype "
                        f"{_UNSUPPORTED_STORAGES[storage.type_name]} ({storage.type_name}); "
                        "rgref loads only float32, float16, float64 and bfloat16 tensors")
                if storage.key in storages:
                    if storages[storage.key][2] != storage:
                        raise CheckpointError(
                            f"{path}: storage {storage.key} is named with two different types "
                            "or sizes; the file is corrupt")
                    continue
                entry = prefix + "data/" + storage.key
                try:
                    info = archive.getinfo(entry)
                except KeyError:
                    raise CheckpointError(
                        f"{path}: entry {entry}, which contains tensor {name!r}, is missing from "
                        "the archive; the file is truncated or corrupt, download it "
                        "again") from None
                dtype = _STORAGE_DTYPES[storage.type_name].newbyteorder(byte_order)
                if info.file_size != storage.numel * dtype.itemsize:
                    raise CheckpointError(
                        f"{path}: entry {entry} is {info.file_size} bytes but tensor {name!r} "
                        f"needs {storage.numel} {storage.type_name} elements of "
                        f"{dtype.itemsize} bytes; the file is corrupt")
                offset = _entry_data_offset(f, info, path, file_size)
                storages[storage.key] = (dtype, offset, storage)

    # One read-only map of the whole file; every tensor is a view into it.
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    arrays: dict[str, np.ndarray] = {}
    for key, (dtype, offset, storage) in storages.items():
        arrays[key] = mapped[offset:offset + storage.numel * dtype.itemsize].view(dtype)
    tensors = {name: _tensor_view(arrays[tensor.storage.key], tensor, path, name)
               for name, tensor in records.items()}
    if byte_order != _NATIVE_BYTE_ORDER:
        # NOTE: a file written on a machine of the other byte order is copied and
        # byte-swapped, not mapped, because the rest of rgref (bfloat16 detection
        # included) expects native-order arrays.
        tensors = {name: array.astype(array.dtype.newbyteorder("="))
                   for name, array in tensors.items()}
    return tensors
