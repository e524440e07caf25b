"""Reading torch.save checkpoints without PyTorch (rgref.torch_checkpoint).

The fixtures in tests/data/torch/ were written by torch.save, and their `.npz`
files contain the values torch reads back. If they go stale, regenerate them with
the environment `make tools-env` creates:
  .venv-ref/bin/python tools/make_torch_fixtures.py --out tests/data/torch
These tests run without torch: the malicious and corrupt archives are built here
with zipfile and hand-written pickles.
"""

import functools
import io
import os
import pathlib
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from rgref.torch_checkpoint import CheckpointError, UnsafePickleError, load_torch_state_dict

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "torch")
REGENERATE = ".venv-ref/bin/python tools/make_torch_fixtures.py --out tests/data/torch"


def fixture_path(name: str) -> str:
    return os.path.join(DATA, name)


def expected_tensors(name: str) -> dict[str, np.ndarray]:
    with np.load(fixture_path(name + ".npz")) as npz:
        return {key: npz[key] for key in npz.files if key != "metadata"}


def rewrite_archive(source: str, target: str, drop=(), compress=(), replace=None) -> None:
    """Copy a torch.save archive entry by entry with Python's zipfile.

    Entries named by their path inside the archive directory (`data/0`) can be
    dropped, DEFLATE-compressed or given new bytes. zipfile writes no alignment
    padding, so the data offsets differ from torch's.
    """
    replace = replace or {}
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            inner = info.filename.split("/", 1)[1]
            if inner in drop:
                continue
            data = replace.get(inner, old.read(info))
            method = zipfile.ZIP_DEFLATED if inner in compress else zipfile.ZIP_STORED
            new.writestr(zipfile.ZipInfo(info.filename), data, compress_type=method)


def write_archive(path, entries: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)


# ------------------------------------------------------------ reading values

@pytest.mark.parametrize("name", ["mixed", "griffin_tiny"])
def test_fixture_values_match_torch(name):
    loaded = load_torch_state_dict(fixture_path(name + ".pt"))
    expected = expected_tensors(name)
    assert list(loaded) == list(expected), "tensor names or order differ from torch.load"
    for key, want in expected.items():
        got = loaded[key]
        assert got.dtype == want.dtype, f"{key}: dtype {got.dtype}, torch has {want.dtype}"
        assert got.shape == want.shape, f"{key}: shape {got.shape}, torch has {want.shape}"
        assert np.array_equal(got, want), (
            f"{key}: values differ from torch's; if the fixture changed, run {REGENERATE}")


def test_dtypes_of_mixed_fixture():
    loaded = load_torch_state_dict(fixture_path("mixed.pt"))
    assert loaded["float32"].dtype == np.float32
    assert loaded["bfloat16"].dtype == np.uint16  # bfloat16 bits
    assert loaded["float16"].dtype == np.float16
    assert loaded["float64"].dtype == np.float64


def test_scalar_empty_and_parameter():
    loaded = load_torch_state_dict(fixture_path("mixed.pt"))
    assert loaded["scalar"].shape == ()
    assert loaded["scalar"] == 1.5
    assert loaded["empty"].shape == (0, 5)
    assert type(loaded["parameter"]) is np.memmap


def test_contiguous_tensors_are_memory_mapped():
    for name in ("mixed", "griffin_tiny"):
        path = fixture_path(name + ".pt")
        loaded = load_torch_state_dict(path)
        for key, array in loaded.items():
            if array.size == 0 or key in ("shared.transpose", "shared.columns"):
                continue
            assert isinstance(array, np.memmap), f"{name}:{key} is a {type(array).__name__}"
            assert array.filename == os.path.abspath(path), f"{name}:{key} maps another file"
            assert not array.flags.writeable, f"{name}:{key} is writeable"


def test_views_share_the_mapped_storage():
    loaded = load_torch_state_dict(fixture_path("mixed.pt"))
    base = loaded["shared.base"]
    for key in ("shared.transpose", "shared.columns", "shared.row"):
        assert np.shares_memory(loaded[key], base), f"{key} was copied"
        assert not loaded[key].flags.writeable, f"{key} is writeable"
    assert np.array_equal(loaded["shared.transpose"], base.T)
    assert np.array_equal(loaded["shared.columns"], base[1:3, 2:5])
    assert np.array_equal(loaded["shared.row"], base[2])
    assert not loaded["shared.transpose"].flags.c_contiguous


def test_arrays_are_read_only():
    loaded = load_torch_state_dict(fixture_path("mixed.pt"))
    with pytest.raises(ValueError):
        loaded["float32"][0, 0] = 1.0
    with pytest.raises(ValueError):
        loaded["shared.transpose"][0, 0] = 1.0


def test_archive_written_by_zipfile(tmp_path):
    # No 64-byte alignment padding: offsets come only from the local headers.
    target = tmp_path / "rezipped.pt"
    rewrite_archive(fixture_path("mixed.pt"), target)
    loaded = load_torch_state_dict(target)
    for key, want in expected_tensors("mixed").items():
        assert np.array_equal(loaded[key], want), key


def test_big_endian_archive(tmp_path):
    # Every storage of the Griffin fixture is bfloat16, so swapping each pair of
    # bytes turns the file into the one a big-endian machine would write.
    source = fixture_path("griffin_tiny.pt")
    with zipfile.ZipFile(source) as archive:
        swapped = {info.filename.split("/", 1)[1]:
                   np.frombuffer(archive.read(info), "<u2").astype(">u2").tobytes()
                   for info in archive.infolist() if "/data/" in info.filename}
    swapped["byteorder"] = b"big"
    target = tmp_path / "big.pt"
    rewrite_archive(source, target, replace=swapped)
    loaded = load_torch_state_dict(target)
    for key, want in expected_tensors("griffin_tiny").items():
        assert loaded[key].dtype == np.uint16, key
        assert np.array_equal(loaded[key], want), key


def test_loader_never_imports_torch():
    script = ("import sys; from rgref.torch_checkpoint import load_torch_state_dict; "
              f"load_torch_state_dict({fixture_path('griffin_tiny.pt')!r}); "
              "assert 'torch' not in sys.modules, 'torch was imported'")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------- malicious pickles

class _Reduce:
    """Pickles as `callable(*args)`, which plain pickle.loads would run."""

    def __init__(self, callable_, *args):
        self.callable_, self.args = callable_, args

    def __reduce__(self):
        return self.callable_, self.args


def _touch_command(marker) -> str:
    return f"open({str(marker)!r}, 'w').close()"


def _payloads(marker) -> dict[str, tuple[bytes, str]]:
    """Pickles that create `marker` when unpickled, and the global each one imports."""
    shell = f"touch '{marker}'".encode()
    code = _touch_command(marker).encode()
    return {
        # Protocol 0: GLOBAL os.system, then REDUCE with the command.
        "GLOBAL os.system": (b"cos\nsystem\n(S'" + shell + b"'\ntR.", "os.system"),
        # Protocol 4: the global's names are pushed on the stack for STACK_GLOBAL.
        "STACK_GLOBAL builtins.exec": (
            b"\x80\x04\x8c\x08builtins\x8c\x04exec\x93"
            + b"\x8c" + bytes([len(code)]) + code + b"\x85R.", "builtins.exec"),
        # INST both imports and calls; it is rejected as an opcode.
        "INST os.system": (b"(S'" + shell + b"'\nios\nsystem\n.", "INST"),
        # A call nested in the value of a state dict entry, after a harmless entry.
        "nested subprocess.call": (pickle.dumps(
            {"ok": [1.0], "weight": _Reduce(subprocess.call, ["touch", str(marker)])},
            protocol=2, fix_imports=False), "subprocess.call"),
        "nested subprocess.call, protocol 4": (pickle.dumps(
            {"ok": [1.0], "weight": _Reduce(subprocess.call, ["touch", str(marker)])},
            protocol=4), "subprocess.call"),
        # __reduce__ returning a functools.partial that wraps exec.
        "functools.partial": (pickle.dumps(
            _Reduce(functools.partial(exec, _touch_command(marker))), protocol=2),
            "functools.partial"),
        "functools.partial, protocol 4": (pickle.dumps(
            _Reduce(functools.partial(exec, _touch_command(marker))), protocol=4),
            "functools.partial"),
        # An allowlisted global whose attributes BUILD would overwrite.
        "BUILD on an allowed function": (
            b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}X\x07\x00\x00\x00__doc__"
            b"X\x01\x00\x00\x00xsb.", "method"),
    }


@pytest.mark.parametrize("variant", list(_payloads("marker")))
def test_malicious_pickle_rejected_unrun(tmp_path, variant):
    marker = tmp_path / "marker"
    payload, forbidden = _payloads(marker)[variant]
    checkpoint = tmp_path / "evil.pt"
    write_archive(checkpoint, {"evil/data.pkl": payload, "evil/byteorder": b"little"})

    with pytest.raises(UnsafePickleError) as raised:
        load_torch_state_dict(checkpoint)
    message = str(raised.value)
    assert str(checkpoint) in message, message
    assert "evil/data.pkl" in message, message
    assert forbidden in message, message
    assert not marker.exists(), f"{variant}: the payload ran"


@pytest.mark.parametrize("variant", [v for v in _payloads("marker")
                                     if not v.startswith("BUILD")])
def test_malicious_payload_is_live(tmp_path, variant):
    # The payloads above must really run code under plain pickle, or the
    # rejection test would prove nothing.
    marker = tmp_path / "marker"
    payload, _ = _payloads(marker)[variant]
    pickle.loads(payload)
    assert marker.exists(), f"{variant}: the payload does nothing under pickle.loads"


# ------------------------------------------------------- corrupt archives

def _error(path) -> str:
    with pytest.raises(CheckpointError) as raised:
        load_torch_state_dict(path)
    return str(raised.value)


def test_truncated_archive(tmp_path):
    data = pathlib.Path(fixture_path("griffin_tiny.pt")).read_bytes()
    target = tmp_path / "truncated.pt"
    target.write_bytes(data[:len(data) // 2])
    message = _error(target)
    assert "truncated or corrupt" in message, message
    assert str(target) in message, message


def test_missing_data_pkl(tmp_path):
    target = tmp_path / "no_pickle.pt"
    write_archive(target, {"archive/data/0": b"\0" * 16})
    message = _error(target)
    assert "no entry archive/data.pkl" in message, message


def test_missing_storage_entry(tmp_path):
    target = tmp_path / "missing.pt"
    rewrite_archive(fixture_path("mixed.pt"), target, drop={"data/1"})
    message = _error(target)
    assert "entry mixed/data/1" in message, message
    assert "missing" in message, message
    assert "'bfloat16'" in message, message  # the tensor stored in data/1


def test_compressed_storage_entry(tmp_path):
    target = tmp_path / "compressed.pt"
    rewrite_archive(fixture_path("mixed.pt"), target, compress={"data/0"})
    message = _error(target)
    assert "entry mixed/data/0 is compressed" in message, message


def test_storage_entry_of_wrong_size(tmp_path):
    target = tmp_path / "short.pt"
    rewrite_archive(fixture_path("mixed.pt"), target, replace={"data/0": b"\0" * 8})
    message = _error(target)
    assert "entry mixed/data/0 is 8 bytes" in message, message
    assert "'float32'" in message, message


def test_legacy_format_rejected():
    message = _error(fixture_path("legacy.pt"))
    assert "legacy torch.save format" in message, message
    assert "torch.save(" in message, message


def test_unsupported_dtype_rejected():
    message = _error(fixture_path("int64.pt"))
    assert "tensor 'int64' has dtype int64 (LongStorage)" in message, message


def test_file_that_is_not_a_zip(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}" + b" " * 14)
    message = _error(target)
    assert "not a torch.save zip archive" in message, message


def test_missing_file(tmp_path):
    message = _error(tmp_path / "absent.pt")
    assert "not found" in message, message


def test_invalid_pickle(tmp_path):
    target = tmp_path / "garbage.pt"
    write_archive(target, {"garbage/data.pkl": b"\x80\x02\xffnot a pickle"})
    message = _error(target)
    assert "garbage/data.pkl is not a valid pickle" in message, message


def test_pickle_that_is_not_a_dict(tmp_path):
    target = tmp_path / "list.pt"
    write_archive(target, {"list/data.pkl": pickle.dumps([1.0, 2.0], protocol=2)})
    message = _error(target)
    assert "contains a list, not a state dict" in message, message


def test_state_dict_entry_that_is_not_a_tensor(tmp_path):
    target = tmp_path / "nested.pt"
    write_archive(target, {"nested/data.pkl": pickle.dumps({"model": {}}, protocol=2)})
    message = _error(target)
    assert "entry 'model' is a dict, not a tensor" in message, message


def test_tensor_outside_its_storage(tmp_path):
    # Rewrite the first tensor's storage offset (BININT1 0 after BINPERSID) to 40,
    # past the end of its 15-element storage.
    with zipfile.ZipFile(fixture_path("mixed.pt")) as archive:
        pickled = archive.read("mixed/data.pkl")
    position = pickled.index(b"Q" + b"K\x00")
    corrupted = pickled[:position] + b"QK\x28" + pickled[position + 3:]
    target = tmp_path / "offset.pt"
    rewrite_archive(fixture_path("mixed.pt"), target, replace={"data.pkl": corrupted})
    message = _error(target)
    assert "tensor 'float32'" in message, message
    assert "storage offset 40" in message, message


def test_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)
    assert issubclass(UnsafePickleError, CheckpointError)
