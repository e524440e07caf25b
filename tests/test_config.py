"""Config presets and Hugging Face config.json parsing."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest

from rgref.config import PRESET_NAMES, Config, ConfigError

# recurrentgemma-2b's config.json as published on Hugging Face (the fields rgref reads).
HF_2B = {
    "architectures": ["RecurrentGemmaForCausalLM"], "model_type": "recurrent_gemma",
    "attention_bias": False, "attention_window_size": 2048, "bos_token_id": 2,
    "conv1d_width": 4, "eos_token_id": 1, "final_w_init_variance_scale": 0.0769,
    "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2560,
    "intermediate_size": 15360, "logits_soft_cap": 30.0, "lru_width": 2560,
    "num_attention_heads": 10, "num_hidden_layers": 26, "num_key_value_heads": 1,
    "pad_token_id": 0, "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0, "torch_dtype": "float32", "vocab_size": 256000,
    "w_init_variance_scale": 0.01, "_block_types": ["recurrent", "recurrent", "attention"],
}


def test_presets_match_official_table():
    expected = {
        "recurrentgemma-2b": (2560, 7680, 10, 2560, 26, 2048, True, 30.0),
        "recurrentgemma-9b": (4096, 12288, 16, 4096, 38, 2048, True, 30.0),
        "griffin-7b": (4096, 12288, 32, 5632, 32, 1024, False, None),
        "hawk-7b": (4096, 12288, 32, 5632, 32, 1024, False, None),
    }
    assert set(PRESET_NAMES) == set(expected)
    for name, fields in expected.items():
        c = Config.from_preset(name)
        assert (c.width, c.mlp_width, c.num_heads, c.lru_width, c.num_blocks,
                c.attention_window, c.embeddings_scale_by_sqrt_dim, c.logits_soft_cap) == fields
        assert c.vocab_size == 256_000


def test_preset_block_patterns():
    assert Config.from_preset("recurrentgemma-2b").block_types[:6] == (
        "recurrent", "recurrent", "attention") * 2
    assert Config.from_preset("recurrentgemma-2b").block_types[-2:] == ("recurrent", "recurrent")
    assert set(Config.from_preset("hawk-7b").block_types) == {"recurrent"}


def test_unknown_preset_lists_names():
    with pytest.raises(ConfigError, match="recurrentgemma-2b"):
        Config.from_preset("gemma-2b")


def test_hf_config_old_spelling_equals_2b_preset():
    assert Config.from_hf_config(HF_2B) == Config.from_preset("recurrentgemma-2b")


def test_hf_config_new_spelling():
    hf = dict(HF_2B)
    hf["block_types"] = hf.pop("_block_types")
    assert Config.from_hf_config(hf) == Config.from_preset("recurrentgemma-2b")


def test_hf_config_extra_keys():
    hf = dict(HF_2B, embeddings_scale_by_sqrt_dim=False, logits_soft_cap=0.0)
    config = Config.from_hf_config(hf)
    assert config.embeddings_scale_by_sqrt_dim is False
    assert config.logits_soft_cap is None
    assert Config.from_hf_config(dict(HF_2B, logits_soft_cap=None)).logits_soft_cap is None


def test_hf_config_round_trip():
    for name in PRESET_NAMES:
        config = Config.from_preset(name)
        assert Config.from_hf_config(json.loads(json.dumps(config.to_hf_config()))) == config


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gemma"}, "model_type"),
    ({"hidden_size": 2561}, "not divisible"),
    ({"intermediate_size": 15361}, "odd"),
    ({"num_key_value_heads": 10}, "one key/value head"),
    ({"_block_types": ["recurrent", "mamba"]}, "mamba"),
    ({"num_hidden_layers": 0}, "num_hidden_layers|block_types"),
])
def test_hf_config_invalid(change, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_hf_config(dict(HF_2B, **change))


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": "forty"}, "hidden_size must be an integer, got 'forty'"),
    ({"hidden_size": None}, "hidden_size must be an integer, got None"),
    ({"hidden_size": [2560]}, "hidden_size must be an integer"),
    ({"hidden_size": 2560.5}, "hidden_size must be an integer, got 2560.5"),
    ({"num_attention_heads": True}, "num_attention_heads must be an integer"),
    ({"rms_norm_eps": "1e-6"}, "rms_norm_eps must be a number"),
    ({"logits_soft_cap": "30"}, "logits_soft_cap must be a number"),
    ({"embeddings_scale_by_sqrt_dim": "false"}, "must be true or false"),
    ({"_block_types": 5}, "block_types must be a non-empty list"),
])
def test_hf_config_wrong_json_type(change, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        Config.from_hf_config(dict(HF_2B, **change))


def test_hf_config_whole_float_accepted():
    config = Config.from_hf_config(dict(HF_2B, hidden_size=2560.0))
    assert config.width == 2560
    assert isinstance(config.width, int)


def test_hf_config_null_entries():
    config = Config.from_hf_config(dict(HF_2B, logits_soft_cap=None, lru_width=None))
    assert config.logits_soft_cap is None
    assert config.lru_width == config.width


def test_config_file_not_utf8(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b'{"hidden_size": "\xff\xfe"}')
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        Config.from_json_file(path)


def test_hf_config_missing_key():
    hf = dict(HF_2B)
    del hf["hidden_size"]
    with pytest.raises(ConfigError, match="hidden_size"):
        Config.from_hf_config(hf)


def test_config_rejects_bad_fields():
    base = Config.from_preset("recurrentgemma-2b")
    with pytest.raises(ConfigError, match="width"):
        dataclasses.replace(base, width=-1)
    with pytest.raises(ConfigError, match="multiple of 4"):
        dataclasses.replace(base, width=60, num_heads=10, lru_width=60)


def test_import_rgref_is_light():
    """`import rgref` loads NumPy only: no tokenizer, safetensors, cffi or model code."""
    script = ("import sys, rgref; heavy = [m for m in ('sentencepiece', 'safetensors', "
              "'cffi', 'rgref.model', 'rgref.kernels', 'rgref._kernels', 'torch', 'jax') "
              "if m in sys.modules]; print(heavy)")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=repo)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
