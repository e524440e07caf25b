"""Config inference from shapes (rgref.infer_config) and tools/convert_checkpoint.py.

The source is the tiny official checkpoint tests/data/torch/griffin_tiny.pt
(bfloat16, written by recurrentgemma.torch and torch.save); see
test_torch_checkpoint.py for how to regenerate it.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from tolerances import assert_close

import rgref
from rgref.config import ATTENTION, PRESET_NAMES, RECURRENT, Config, ConfigError
from rgref.dtypes import bfloat16_to_float32
from rgref.infer_config import check_shapes, infer_config
from rgref.names import expected_shapes, official_to_hf
from rgref.safetensors_file import (SafetensorsError, load_safetensors, save_safetensors,
                                    save_safetensors_streaming)
from rgref.torch_checkpoint import load_torch_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFICIAL = os.path.join(ROOT, "tests", "data", "torch", "griffin_tiny.pt")
TOOL = os.path.join(ROOT, "tools", "convert_checkpoint.py")

# The structure of griffin_tiny.pt (see tools/make_torch_fixtures.py), with the
# hyperparameters of the preset the tests pass.
TINY_CONFIG = Config(
    vocab_size=32, width=16, mlp_width=40, num_heads=2, lru_width=24,
    block_types=(RECURRENT, RECURRENT, ATTENTION, RECURRENT), attention_window=2048,
    embeddings_scale_by_sqrt_dim=True, logits_soft_cap=30.0)
PRESET = "recurrentgemma-2b"


def load_tool():
    spec = importlib.util.spec_from_file_location("convert_checkpoint", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tool():
    return load_tool()


def expected_hf_tensors() -> dict[str, np.ndarray]:
    """The official fixture's values as torch read them, renamed to Hugging Face layout."""
    with np.load(OFFICIAL.replace(".pt", ".npz")) as npz:
        official = {key: npz[key] for key in npz.files if key != "metadata"}
    return official_to_hf(official)


def read_output(directory) -> tuple[Config, dict[str, np.ndarray]]:
    config = Config.from_json_file(os.path.join(directory, "config.json"))
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    tensors = {}
    for shard in shards:
        tensors.update(load_safetensors(os.path.join(directory, shard)))
    return config, tensors


def shape_only(shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Zero-stride arrays of the given shapes, which take no memory."""
    return {name: np.broadcast_to(np.float32(0), shape) for name, shape in shapes.items()}


# ------------------------------------------------------------ infer_config

def test_infer_tiny_official_config():
    tensors = load_torch_state_dict(OFFICIAL)
    config = infer_config(tensors, preset=PRESET)
    assert config == TINY_CONFIG
    hf = official_to_hf(tensors)
    assert {name: hf[name].shape for name in hf} == expected_shapes(config)


def test_infer_without_matching_preset():
    with pytest.raises(ConfigError, match="match no preset.*--preset"):
        infer_config(load_torch_state_dict(OFFICIAL))


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_infer_matches_preset_by_structure(preset):
    config = Config.from_preset(preset)
    assert infer_config(shape_only(expected_shapes(config))) == config


def test_infer_preset_keeps_inferred_structure():
    # griffin-7b has another window, soft cap and embedding scale than recurrentgemma-2b.
    config = infer_config(load_torch_state_dict(OFFICIAL), preset="griffin-7b")
    assert config.attention_window == 1024
    assert config.logits_soft_cap is None
    assert config.embeddings_scale_by_sqrt_dim is False
    assert (config.width, config.lru_width, config.block_types) == (
        16, 24, TINY_CONFIG.block_types)


def test_infer_missing_block():
    shapes = expected_shapes(TINY_CONFIG)
    tensors = shape_only({n: s for n, s in shapes.items() if not n.startswith("model.layers.1.")})
    with pytest.raises(ConfigError, match="none for block 1"):
        infer_config(tensors, preset=PRESET)


def test_infer_block_with_both_temporal_types():
    shapes = dict(expected_shapes(TINY_CONFIG))
    shapes["model.layers.0.temporal_block.q_proj.weight"] = (16, 16)
    with pytest.raises(ConfigError, match="block 0 has both RG-LRU and attention"):
        infer_config(shape_only(shapes), preset=PRESET)


def test_infer_disagreeing_head_counts():
    shapes = dict(expected_shapes(TINY_CONFIG))
    shapes["model.layers.2.temporal_block.k_proj.weight"] = (4, 16)  # 4 heads of 4
    with pytest.raises(ConfigError, match="head count differs"):
        infer_config(shape_only(shapes), preset=PRESET)


def test_infer_misshapen_tensor():
    shapes = dict(expected_shapes(TINY_CONFIG))
    shapes["model.layers.3.mlp_block.down_proj.weight"] = (16, 41)
    with pytest.raises(ConfigError, match=r"down_proj.weight' has shape \(16, 41\), expected "
                                          r"\(16, 40\)"):
        infer_config(shape_only(shapes), preset=PRESET)


def test_infer_unexpected_tensor():
    shapes = dict(expected_shapes(TINY_CONFIG))
    shapes["model.layers.0.temporal_block.extra"] = (3,)
    with pytest.raises(ConfigError, match="extra' is not part of"):
        infer_config(shape_only(shapes), preset=PRESET)


def test_check_shapes_allows_tied_head():
    shapes = dict(expected_shapes(TINY_CONFIG))
    shapes["lm_head.weight"] = (32, 16)
    check_shapes(TINY_CONFIG, shape_only(shapes))
    shapes["lm_head.weight"] = (16, 32)
    with pytest.raises(ConfigError, match="lm_head.weight"):
        check_shapes(TINY_CONFIG, shape_only(shapes))


# ------------------------------------------------------------ conversion

def test_convert_official_checkpoint(tool, tmp_path):
    config = tool.convert(OFFICIAL, str(tmp_path / "out"), preset=PRESET)
    assert config == TINY_CONFIG
    written_config, tensors = read_output(tmp_path / "out")
    assert written_config == TINY_CONFIG
    assert {name: t.shape for name, t in tensors.items()} == expected_shapes(TINY_CONFIG)
    expected = expected_hf_tensors()
    for name, value in tensors.items():
        assert value.dtype == np.uint16, f"{name}: bfloat16 should stay bfloat16"
        assert np.array_equal(value, expected[name]), name
    with open(tmp_path / "out" / "config.json") as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"


def test_convert_to_float32(tool, tmp_path):
    tool.convert(OFFICIAL, str(tmp_path / "out"), preset=PRESET, dtype="float32")
    _, tensors = read_output(tmp_path / "out")
    for name, value in expected_hf_tensors().items():
        assert tensors[name].dtype == np.float32, name
        assert np.array_equal(tensors[name], bfloat16_to_float32(value)), name


def test_convert_round_trip_through_float32(tool, tmp_path):
    tool.convert(OFFICIAL, str(tmp_path / "bf16"), preset=PRESET)
    tool.convert(str(tmp_path / "bf16"), str(tmp_path / "f32"), dtype="float32")
    tool.convert(str(tmp_path / "f32"), str(tmp_path / "back"), dtype="bfloat16")
    assert (tmp_path / "bf16" / "model.safetensors").read_bytes() == (
        tmp_path / "back" / "model.safetensors").read_bytes()


def test_convert_sharded(tool, tmp_path):
    tool.convert(OFFICIAL, str(tmp_path / "single"), preset=PRESET, dtype="float32")
    max_bytes = 20_000
    tool.convert(OFFICIAL, str(tmp_path / "sharded"), preset=PRESET, dtype="float32",
                 max_shard_bytes=max_bytes)
    with open(tmp_path / "sharded" / "model.safetensors.index.json") as f:
        index = json.load(f)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    for shard in shards:
        tensors = load_safetensors(tmp_path / "sharded" / shard)
        data_bytes = sum(t.nbytes for t in tensors.values())
        assert data_bytes <= max_bytes or len(tensors) == 1, f"{shard}: {data_bytes} bytes"
    _, single = read_output(tmp_path / "single")
    _, sharded = read_output(tmp_path / "sharded")
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in single.values())
    assert set(index["weight_map"]) == set(single)
    for name in single:
        assert np.array_equal(sharded[name], single[name]), name


def test_convert_in_small_chunks(tool, tmp_path, monkeypatch):
    # Several chunks per tensor must concatenate to the same file.
    tool.convert(OFFICIAL, str(tmp_path / "whole"), preset=PRESET, dtype="float32")
    monkeypatch.setattr(tool, "CHUNK_BYTES", 64)
    tool.convert(OFFICIAL, str(tmp_path / "chunked"), preset=PRESET, dtype="float32")
    assert (tmp_path / "whole" / "model.safetensors").read_bytes() == (
        tmp_path / "chunked" / "model.safetensors").read_bytes()


def test_convert_official_safetensors(tool, tmp_path):
    # The same tensors under official names in a safetensors file convert alike.
    with np.load(OFFICIAL.replace(".pt", ".npz")) as npz:
        official = {key: npz[key] for key in npz.files if key != "metadata"}
    save_safetensors(tmp_path / "official.safetensors", official)
    tool.convert(str(tmp_path / "official.safetensors"), str(tmp_path / "out"), preset=PRESET)
    _, tensors = read_output(tmp_path / "out")
    for name, value in expected_hf_tensors().items():
        assert np.array_equal(tensors[name], value), name


def test_convert_copies_tokenizer(tool, tmp_path):
    source = tmp_path / "kaggle" / "2b.pt"
    source.parent.mkdir()
    shutil.copyfile(OFFICIAL, source)
    (source.parent / "tokenizer.model").write_bytes(b"sentencepiece model bytes")
    tool.convert(str(source), str(tmp_path / "out"), preset=PRESET)
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == b"sentencepiece model bytes"


def test_convert_rejects_existing_output(tool, tmp_path):
    tool.convert(OFFICIAL, str(tmp_path / "out"), preset=PRESET)
    with pytest.raises(tool.ConversionError, match="already contains"):
        tool.convert(OFFICIAL, str(tmp_path / "out"), preset=PRESET)
    tool.convert(OFFICIAL, str(tmp_path / "out"), preset=PRESET, overwrite=True)


def test_overwrite_removes_stale_shards(tool, tmp_path):
    tool.convert(OFFICIAL, str(tmp_path / "out"), preset=PRESET, max_shard_bytes=20_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    tool.convert(OFFICIAL, str(tmp_path / "out"), preset=PRESET, overwrite=True)
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]


def test_convert_rejects_source_as_output(tool, tmp_path):
    tool.convert(OFFICIAL, str(tmp_path / "out"), preset=PRESET)
    with pytest.raises(tool.ConversionError, match="is the source directory"):
        tool.convert(str(tmp_path / "out"), str(tmp_path / "out"), overwrite=True)


def test_parse_size(tool):
    assert tool.parse_size("2GB") == 2 * 10**9
    assert tool.parse_size("500MiB") == 500 * 2**20
    assert tool.parse_size("1000") == 1000
    for invalid in ("", "5XB", "-1GB", "0"):
        with pytest.raises(Exception, match="invalid size"):
            tool.parse_size(invalid)


def test_cli_needs_preset_for_unknown_structure(tmp_path):
    result = subprocess.run([sys.executable, TOOL, OFFICIAL, str(tmp_path / "out")],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "error:" in result.stderr, result.stderr
    assert "--preset" in result.stderr, result.stderr
    assert result.stdout == ""


def test_cli_converts(tmp_path):
    result = subprocess.run([sys.executable, TOOL, OFFICIAL, str(tmp_path / "out"),
                             "--preset", PRESET, "--dtype", "bfloat16"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert Config.from_json_file(tmp_path / "out" / "config.json") == TINY_CONFIG


def test_converted_model_matches_official_logits(tool, tmp_path):
    tool.convert(OFFICIAL, str(tmp_path / "out"), preset=PRESET)
    with np.load(OFFICIAL.replace(".pt", "_logits.npz")) as golden:
        tokens, expected = golden["tokens"], golden["logits"]
    logits = rgref.load(tmp_path / "out").forward(tokens)[0]
    assert_close(logits, expected, "golden_float32", label="converted griffin_tiny.pt")


# ------------------------------------------------ streaming safetensors writer

def test_streaming_writer_round_trip(tmp_path):
    values = {"a": np.arange(12, dtype=np.float32).reshape(3, 4),
              "b": np.array([1, 2, 3], dtype=np.uint16), "c": np.float32(2.5).reshape(())}
    layout = {name: (v.dtype, v.shape) for name, v in values.items()}
    save_safetensors_streaming(tmp_path / "x.safetensors", layout,
                               lambda name: [values[name][:1], values[name][1:]]
                               if values[name].ndim else [values[name]])
    loaded = load_safetensors(tmp_path / "x.safetensors")
    for name, value in values.items():
        assert loaded[name].dtype == value.dtype, name
        assert np.array_equal(loaded[name], value), name


def test_streaming_writer_rejects_short_chunks(tmp_path):
    layout = {"a": (np.dtype(np.float32), (3, 4))}
    with pytest.raises(SafetensorsError, match="hold 16 bytes.*need 48"):
        save_safetensors_streaming(tmp_path / "x.safetensors", layout,
                                   lambda name: [np.zeros(4, np.float32)])


def test_streaming_writer_rejects_wrong_dtype(tmp_path):
    layout = {"a": (np.dtype(np.float32), (2,))}
    with pytest.raises(SafetensorsError, match="dtype float64"):
        save_safetensors_streaming(tmp_path / "x.safetensors", layout,
                                   lambda name: [np.zeros(2, np.float64)])
