"""tools/make_synthetic_checkpoint.py: both layouts load to the same model.

The benchmarks run on synthetic checkpoints at the real 2B shapes; these tests
run the same writer on a shrunk config (width 40, 4 blocks) and read the
output with rgref.
"""

import importlib.util
import json
import os
import struct
import zipfile

import numpy as np
import pytest

import rgref
from rgref.config import Config
from rgref.dtypes import bfloat16_to_float32
from rgref.names import expected_shapes
from rgref.safetensors_file import load_safetensors
from rgref.torch_checkpoint import load_torch_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "make_synthetic_checkpoint.py")
PRESET = "recurrentgemma-2b"
# A shard limit this small splits the shrunk model into several shards.
MAX_SHARD_BYTES = 40_000
TOKENS = np.array([[2, 651, 6, 4000, 17, 3, 255, 1024]])


def load_tool():
    spec = importlib.util.spec_from_file_location("make_synthetic_checkpoint", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tool():
    return load_tool()


@pytest.fixture(scope="module")
def config(tool):
    return tool.synthetic_config(PRESET, shrink=64, num_blocks=4)


@pytest.fixture(scope="module")
def written(tool, config, tmp_path_factory):
    """Directories of the shrunk model: bfloat16 in both layouts, float32 in Hugging Face's."""
    root = tmp_path_factory.mktemp("synthetic")
    directories = {}
    for layout, dtype in (("huggingface", "bfloat16"), ("kaggle", "bfloat16"),
                          ("huggingface", "float32")):
        directory = str(root / f"{layout}-{dtype}")
        assert tool.write_checkpoint(directory, config, layout, dtype, name=PRESET,
                                     max_shard_bytes=MAX_SHARD_BYTES, quiet=True)
        directories[layout, dtype] = directory
    return directories


def test_config_is_shrunk_preset(config):
    preset = Config.from_preset(PRESET)
    assert (config.width, config.mlp_width, config.lru_width) == (40, 120, 40)
    assert config.num_heads == preset.num_heads
    assert config.block_types == preset.block_types[:4]
    assert config.attention_window == preset.attention_window
    assert config.vocab_size == 4096     # 256000 / 64, raised to the tokenizer's pieces


def test_layouts_give_identical_logits(written, config):
    hf = rgref.load(written["huggingface", "bfloat16"])
    official = rgref.load(written["kaggle", "bfloat16"], preset=PRESET)
    assert hf.config == config
    assert official.config == config
    for name, value in hf.params.items():
        assert np.array_equal(value, official.params[name]), name
    for backend in ("numpy", "c"):
        if backend == "c" and hf.resolve_backend("auto") != "c":
            continue
        hf_logits, _ = hf.forward(TOKENS, backend=backend)
        official_logits, _ = official.forward(TOKENS, backend=backend)
        assert np.isfinite(hf_logits).all(), backend
        assert np.array_equal(hf_logits, official_logits), backend


def test_float32_holds_bfloat16_values(written):
    narrow = rgref.load(written["huggingface", "bfloat16"])
    wide = rgref.load(written["huggingface", "float32"])
    for name, value in narrow.params.items():
        assert wide.params[name].dtype == np.float32, name
        assert np.array_equal(wide.params[name], bfloat16_to_float32(value)), name


def test_huggingface_files(written, config):
    directory = written["huggingface", "bfloat16"]
    with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
        hf_config = json.load(f)
    assert hf_config["_block_types"] == ["recurrent", "recurrent", "attention"]
    assert "block_types" not in hf_config
    assert hf_config["torch_dtype"] == "bfloat16"
    assert Config.from_hf_config(hf_config) == config

    with open(os.path.join(directory, "model.safetensors.index.json"), encoding="utf-8") as f:
        index = json.load(f)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                      for i in range(1, len(shards) + 1)]
    shapes = expected_shapes(config)
    assert sorted(index["weight_map"]) == sorted(shapes)
    total = 0
    for shard in shards:
        tensors = load_safetensors(os.path.join(directory, shard))
        assert sorted(tensors) == sorted(n for n, s in index["weight_map"].items() if s == shard)
        for name, value in tensors.items():
            assert value.shape == shapes[name], name
            assert value.dtype == np.uint16, name
            total += value.nbytes
    assert index["metadata"]["total_size"] == total
    assert os.path.isfile(os.path.join(directory, "tokenizer.model"))


def test_kaggle_archive_like_torch_save(written, tool, config):
    path = os.path.join(written["kaggle", "bfloat16"], "2b.pt")
    entries = tool.official_entries(config)
    with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
        listed = archive.namelist()
        assert listed[0] == "2b/data.pkl"
        assert {"2b/byteorder", "2b/version"} <= set(listed)
        assert archive.read("2b/byteorder") == b"little"
        data_entries = [n for n in listed if n.startswith("2b/data/")]
        assert data_entries == [f"2b/data/{i}" for i in range(len(entries))]
        for name in data_entries:
            info = archive.getinfo(name)
            assert info.compress_type == zipfile.ZIP_STORED, name
            f.seek(info.header_offset)
            signature, name_length, extra_length = struct.unpack("<4s22xHH", f.read(30))
            assert signature == b"PK\x03\x04", name
            data_offset = info.header_offset + 30 + name_length + extra_length
            assert data_offset % 64 == 0, name
    tensors = load_torch_state_dict(path)
    assert [(n, v.shape) for n, v in tensors.items()] == entries


def test_rerun_keeps_complete_checkpoint(written, tool, config):
    directory = written["huggingface", "bfloat16"]
    before = {name: os.stat(os.path.join(directory, name)).st_mtime_ns
              for name in os.listdir(directory)}
    assert not tool.write_checkpoint(directory, config, "huggingface", "bfloat16", name=PRESET,
                                     max_shard_bytes=MAX_SHARD_BYTES, quiet=True)
    after = {name: os.stat(os.path.join(directory, name)).st_mtime_ns
             for name in os.listdir(directory)}
    assert after == before
    with pytest.raises(FileExistsError, match="other settings"):
        tool.write_checkpoint(directory, config, "huggingface", "bfloat16", seed=1, name=PRESET,
                              max_shard_bytes=MAX_SHARD_BYTES, quiet=True)
