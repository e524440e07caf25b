"""rgref.load on every supported layout, and its errors on broken checkpoints."""

import dataclasses
import json
import os
import pathlib

import numpy as np
import pytest
import safetensors.numpy

import rgref
from rgref.config import Config, ConfigError
from rgref.dtypes import bfloat16_to_float32, float32_to_bfloat16
from rgref import loading
from rgref.loading import CheckpointError
from rgref.model import Cache, Model
from rgref.random_model import random_model
from rgref.saving import save
from tolerances import assert_close

CONFIG = Config(vocab_size=53, width=16, mlp_width=24, num_heads=2, lru_width=16,
                block_types=("recurrent", "recurrent", "attention"), attention_window=4)
TOKENS = np.array([[1, 5, 9, 2, 33, 7, 7, 0, 52, 11]])


@pytest.fixture(scope="module")
def model():
    return random_model(CONFIG, seed=11)


@pytest.fixture
def saved(model, tmp_path):
    save(model, tmp_path)
    return tmp_path


def logits_of(model):
    return model.forward(TOKENS)[0]


def test_load_huggingface_directory(model, saved):
    loaded = rgref.load(saved)
    assert loaded.config == CONFIG
    np.testing.assert_array_equal(logits_of(loaded), logits_of(model))


def test_load_is_memory_mapped(saved):
    loaded = rgref.load(saved)
    assert isinstance(loaded.params["model.embed_tokens.weight"].base, np.memmap) or \
        isinstance(loaded.params["model.embed_tokens.weight"], np.memmap)


def test_load_single_safetensors_file(model, saved):
    loaded = rgref.load(saved / "model.safetensors")
    np.testing.assert_array_equal(logits_of(loaded), logits_of(model))


def test_load_official_names(model, tmp_path):
    save(model, tmp_path, layout="official")
    names = safetensors.numpy.load_file(str(tmp_path / "model.safetensors")).keys()
    assert "blocks.0.recurrent_block.conv_1d.w" in names
    assert "blocks.0.mlp_block.ffw_up.w" in names
    np.testing.assert_array_equal(logits_of(rgref.load(tmp_path)), logits_of(model))


def test_load_sharded(model, tmp_path):
    save(model, tmp_path, max_shard_bytes=8_000)
    shards = sorted(p.name for p in tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    assert (tmp_path / "model.safetensors.index.json").exists()
    np.testing.assert_array_equal(logits_of(rgref.load(tmp_path)), logits_of(model))


@pytest.mark.parametrize("pick", ["first shard", "last shard", "index"])
def test_load_sharded_from_one_file(model, tmp_path, pick):
    save(model, tmp_path, max_shard_bytes=8_000)
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    path = {"first shard": shards[0], "last shard": shards[-1],
            "index": tmp_path / "model.safetensors.index.json"}[pick]
    np.testing.assert_array_equal(logits_of(rgref.load(path)), logits_of(model))


@pytest.mark.parametrize("name", ["config.json", "tokenizer.model"])
def test_load_rejects_non_weights_file(saved, name):
    (saved / name).touch()
    with pytest.raises(CheckpointError, match=f"{name} is not a weights file"):
        rgref.load(saved / name)


def test_load_rejects_preset_beside_config(saved):
    with pytest.raises(ConfigError, match="applies only to a checkpoint without config.json"):
        rgref.load(saved, preset="recurrentgemma-2b")


def test_load_bfloat16(model, tmp_path):
    save(model, tmp_path, weights_dtype="bfloat16")
    loaded = rgref.load(tmp_path)
    embedding = loaded.params["model.embed_tokens.weight"]
    assert embedding.dtype == np.uint16
    rounded = rgref.Model(CONFIG, {n: bfloat16_to_float32(float32_to_bfloat16(v))
                                   for n, v in model.params.items()})
    np.testing.assert_allclose(logits_of(loaded), logits_of(rounded), atol=1e-6, rtol=0)


def test_load_float16(model, tmp_path):
    half = rgref.Model(CONFIG, {n: v.astype(np.float16) for n, v in model.params.items()})
    save(half, tmp_path)
    loaded = rgref.load(tmp_path)
    assert loaded.params["model.embed_tokens.weight"].dtype == np.float16
    widened = rgref.Model(CONFIG, {n: v.astype(np.float32) for n, v in half.params.items()})
    np.testing.assert_array_equal(logits_of(loaded), logits_of(widened))


def test_reference_safetensors_reads_our_files(model, saved):
    """Files rgref writes are valid for the reference `safetensors` package."""
    tensors = safetensors.numpy.load_file(str(saved / "model.safetensors"))
    for name, value in model.params.items():
        np.testing.assert_array_equal(tensors[name], value)


def test_tied_lm_head_is_ignored(model, tmp_path):
    params = dict(model.params)
    params["lm_head.weight"] = params["model.embed_tokens.weight"]
    save(model, tmp_path)
    safetensors.numpy.save_file(params, str(tmp_path / "model.safetensors"))
    np.testing.assert_array_equal(logits_of(rgref.load(tmp_path)), logits_of(model))


# ------------------------------------------------------------------ errors

def rewrite(path, change):
    tensors = safetensors.numpy.load_file(str(path))
    change(tensors)
    safetensors.numpy.save_file(tensors, str(path))


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        rgref.load(tmp_path / "nowhere")


def test_missing_config(saved):
    os.remove(saved / "config.json")
    with pytest.raises(CheckpointError, match="no config.json"):
        rgref.load(saved)


def test_no_weights(saved):
    os.remove(saved / "model.safetensors")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        rgref.load(saved)


def test_missing_tensor(saved):
    rewrite(saved / "model.safetensors",
            lambda t: t.pop("model.layers.2.temporal_block.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model.layers.2.temporal_block.k_proj.weight "
                                              r"\(shape \(8, 16\)\) is missing"):
        rgref.load(saved)


def test_unexpected_tensor(saved):
    rewrite(saved / "model.safetensors",
            lambda t: t.update({"model.layers.9.mlp_block.up_proj.bias": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match="unexpected tensor model.layers.9"):
        rgref.load(saved)


def test_wrong_shape(saved):
    def change(t):
        t["model.layers.0.temporal_block.linear_x.weight"] = np.zeros((16, 17), np.float32)
    rewrite(saved / "model.safetensors", change)
    with pytest.raises(CheckpointError, match=r"linear_x.weight has shape \(16, 17\), "
                                              r"expected \(16, 16\)"):
        rgref.load(saved)


def test_wrong_dtype(saved):
    def change(t):
        t["model.final_norm.weight"] = np.zeros(16, np.int32)
    rewrite(saved / "model.safetensors", change)
    with pytest.raises(CheckpointError, match="model.final_norm.weight has dtype int32"):
        rgref.load(saved)


def test_config_contradicts_weights(saved):
    config = json.loads((saved / "config.json").read_text())
    config["hidden_size"] = 32
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="shape"):
        rgref.load(saved)


def test_invalid_config_json(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        rgref.load(saved)


def test_truncated_safetensors(saved):
    path = saved / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        rgref.load(saved)


def test_corrupt_header(saved):
    path = saved / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"\xff" * 12
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="not valid JSON"):
        rgref.load(saved)


def test_not_safetensors(saved):
    (saved / "model.safetensors").write_bytes(b"PK\x03\x04 this is a zip file, not safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        rgref.load(saved)


def test_index_names_missing_shard(model, tmp_path):
    save(model, tmp_path, max_shard_bytes=8_000)
    os.remove(sorted(tmp_path.glob("model-*-of-*.safetensors"))[1])
    with pytest.raises(CheckpointError, match="lists shard model-00002-of-.* does not exist"):
        rgref.load(tmp_path)


def test_token_outside_vocabulary(model):
    with pytest.raises(ValueError, match=r"token id 53 at index \[0, 2\] is outside the "
                                         r"vocabulary \[0, 53\)"):
        model.forward(np.array([[1, 2, 53]]))
    with pytest.raises(ValueError, match="token id -1"):
        model.forward(np.array([[-1]]))


def test_bad_segment_pos(model):
    with pytest.raises(ValueError, match="shaped like tokens"):
        model.forward(np.array([[1, 2]]), segment_pos=np.array([[0, 1, 2]]))
    with pytest.raises(ValueError, match="segment_pos -2 at index"):
        model.forward(np.array([[1, 2]]), segment_pos=np.array([[0, -2]]))


def test_bad_tokens(model):
    with pytest.raises(ValueError, match="integer array of shape"):
        model.forward(np.array([1.0, 2.0]))
    _, cache = model.forward(np.array([[1, 2]]))
    with pytest.raises(ValueError, match="batch size 2 but the cache was built for 1"):
        model.forward(np.array([[1], [2]]), cache=cache)


def test_right_padding_scores_like_unpadded(model):
    padded, _ = model.forward(np.array([[5, 6, 7, 0, 0]]),
                              segment_pos=np.array([[0, 1, 2, -1, -1]]))
    alone, _ = model.forward(np.array([[5, 6, 7]]))
    np.testing.assert_array_equal(padded[:, :3], alone)


def test_token_after_right_padding_rejected(model):
    with pytest.raises(ValueError, match=r"segment_pos 3 at index \[0, 4\] comes after "
                                         r"padding \(-1\) that follows tokens of row 0"):
        model.forward(np.array([[5, 6, 7, 0, 8]]), segment_pos=np.array([[0, 1, 2, -1, 3]]))
    # Across calls: the row that ended in padding takes no more tokens, by default
    # positions or given ones, and the cache is left as it was.
    _, cache = model.forward(np.array([[5, 6, 0], [5, 6, 7]]),
                             segment_pos=np.array([[0, 1, -1], [0, 1, 2]]))
    before = cache.copy()
    with pytest.raises(ValueError, match=r"index \[0, 0\] comes after padding"):
        model.forward(np.array([[8], [8]]), cache=cache)
    with pytest.raises(ValueError, match=r"index \[0, 0\] comes after padding"):
        model.forward(np.array([[8], [8]]), segment_pos=np.array([[2], [3]]), cache=cache)
    assert cache.num_tokens == before.num_tokens
    # More padding for the ended row is fine, and the other row goes on.
    model.forward(np.array([[0], [8]]), segment_pos=np.array([[-1], [3]]), cache=cache)
    assert cache.ended.tolist() == [True, False]


def test_padding_across_calls_accepted(model):
    _, cache = model.forward(np.array([[0, 0]]), segment_pos=np.array([[-1, -1]]))
    model.forward(np.array([[0, 5]]), segment_pos=np.array([[-1, 0]]), cache=cache)
    assert cache.last_segment_pos.tolist() == [0]


@pytest.mark.parametrize("change, message", [
    (dict(attention_window=8), r"blocks\[2\].keys is a float32 array of shape \(1, 8, 8\)"),
    (dict(lru_width=48), r"blocks\[0\].rg_lru_state is a float32 array of shape \(1, 48\)"),
    (dict(block_types=("attention", "recurrent", "attention")), "cache block 0 is of type"),
    (dict(block_types=("recurrent",) * 4), "the cache has 4 blocks"),
])
def test_cache_from_other_config_rejected(model, change, message):
    other = random_model(dataclasses.replace(CONFIG, **change), seed=1)
    _, cache = other.forward(np.array([[1, 2]]))
    before = cache.copy()
    with pytest.raises(ValueError, match=message):
        model.forward(np.array([[3]]), cache=cache)
    assert cache.num_tokens == before.num_tokens
    for state, state_before in zip(cache.blocks, before.blocks):
        for value, value_before in zip(vars(state).values(), vars(state_before).values()):
            np.testing.assert_array_equal(value, value_before)


def test_cache_of_other_dtype_rejected(model):
    wide = Model(CONFIG, model.params, dtype=np.float64)
    _, cache = wide.forward(np.array([[1, 2]]))
    with pytest.raises(ValueError, match="another config or compute dtype"):
        model.forward(np.array([[3]]), cache=cache)


def test_broadcast_cache_rejected(model):
    _, single = model.forward(np.array([[1, 2, 3]]))

    def spread(value):
        return np.broadcast_to(value, (3,) + value.shape[1:])

    blocks = [type(state)(**{k: spread(v) for k, v in vars(state).items()})
              for state in single.blocks]
    cache = Cache(single.num_tokens, spread(single.last_segment_pos),
                  spread(single.num_documents), spread(single.recent_segment_pos), blocks)
    with pytest.raises(ValueError, match=r"cache blocks\[0\].rg_lru_state is read-only"):
        model.forward(np.array([[4], [5], [6]]), cache=cache)


def test_cache_of_wrong_type_rejected(model):
    with pytest.raises(TypeError, match="cache must be a Cache.*got tuple"):
        model.forward(np.array([[3]]), cache=(1, 2))


# ------------------------------------------- official PyTorch checkpoints

TORCH_DIR = os.path.join(os.path.dirname(__file__), "data", "torch")
TINY_PT = os.path.join(TORCH_DIR, "griffin_tiny.pt")


def official_tiny_logits():
    with np.load(os.path.join(TORCH_DIR, "griffin_tiny_logits.npz")) as golden:
        return golden["tokens"], golden["logits"]


def test_load_torch_file_matches_official_logits():
    tokens, expected = official_tiny_logits()
    # The tiny model's structure matches no preset; its hyperparameters are 2B's.
    model = rgref.load(TINY_PT, preset="recurrentgemma-2b")
    assert_close(model.forward(tokens)[0], expected, "golden_float32", "griffin_tiny.pt")


def test_load_kaggle_directory(tmp_path):
    (tmp_path / "2b.pt").write_bytes(pathlib.Path(TINY_PT).read_bytes())
    tokens, expected = official_tiny_logits()
    model = rgref.load(tmp_path, preset="recurrentgemma-2b")
    assert_close(model.forward(tokens)[0], expected, "golden_float32", "directory with 2b.pt")


def test_load_torch_without_preset_explains(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json beside it.*pass the preset"):
        rgref.load(TINY_PT)


def test_directory_with_two_torch_files(tmp_path):
    for name in ("2b.pt", "2b-it.pt"):
        (tmp_path / name).write_bytes(pathlib.Path(TINY_PT).read_bytes())
    with pytest.raises(CheckpointError, match="several PyTorch checkpoints"):
        rgref.load(tmp_path)


def test_empty_directory(tmp_path):
    with pytest.raises(CheckpointError, match="is it a RecurrentGemma checkpoint directory"):
        rgref.load(tmp_path)


def test_load_narrowed_to_bfloat16(model, saved, tmp_path_factory):
    reports = []
    narrowed = rgref.load(saved, weights_dtype="bfloat16",
                          progress=lambda done, total: reports.append((done, total)))
    assert all(v.dtype == np.uint16 for v in narrowed.params.values())
    stored = tmp_path_factory.mktemp("bf16")
    save(model, stored, weights_dtype="bfloat16")
    np.testing.assert_array_equal(logits_of(narrowed), logits_of(rgref.load(stored)))
    total = sum(v.nbytes for v in model.params.values())
    assert reports[-1] == (total, total)


def test_load_rejects_unknown_weights_dtype(saved):
    with pytest.raises(ValueError, match="weights_dtype"):
        rgref.load(saved, weights_dtype="int8")


def test_transposed_view_copied_in_tiles(tmp_path):
    values = np.arange(300 * 200, dtype=np.float32).reshape(300, 200)
    values.tofile(tmp_path / "values.bin")
    mapped = np.memmap(tmp_path / "values.bin", dtype=np.float32, mode="r", shape=(300, 200))
    copy = loading._contiguous(mapped.T)
    assert copy.flags.c_contiguous
    np.testing.assert_array_equal(copy, values.T)


def test_official_layout_narrowed_to_bfloat16(model, tmp_path):
    official = tmp_path / "official"
    save(model, official, layout="official")
    narrowed = rgref.load(official, weights_dtype="bfloat16")
    up = narrowed.params["model.layers.0.mlp_block.up_proj.weight"]
    assert up.dtype == np.uint16
    assert up.flags.c_contiguous
    stored = tmp_path / "bf16"
    save(model, stored, weights_dtype="bfloat16")
    np.testing.assert_array_equal(logits_of(narrowed), logits_of(rgref.load(stored)))
