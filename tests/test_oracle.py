"""rgref as the oracle of other ports: intermediates, saved checkpoints, decode paths.

Other projects compare their RecurrentGemma ports with rgref's logits and with
the named intermediate activations `Model.forward(..., return_intermediates=True)`
returns (docs/ORACLE.md lists them). These tests check that the intermediates
agree with each other and with the logits. They check that a saved model
reloads to the same numbers in both checkpoint layouts and that two models in
one process do not interact. The last ones pin how rgref decodes next to a
document start, where the official decode paths differ from rgref
(docs/ARCHITECTURE.md).
"""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

import rgref
from rgref import layers
from rgref.config import ATTENTION, RECURRENT, Config
from rgref.dtypes import float32_to_bfloat16
from rgref.model import INTERMEDIATE_NAMES, Model
from rgref.random_model import random_model
from rgref.safetensors_file import load_safetensors
from rgref.saving import save
from test_golden import GOLDEN_DIR, read_case
from tolerances import assert_close, tolerance

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Both block kinds, lru_width != width, and a window shorter than TOKENS.
CONFIG = Config(vocab_size=61, width=16, mlp_width=40, num_heads=2, lru_width=24,
                block_types=(RECURRENT, RECURRENT, ATTENTION, RECURRENT),
                attention_window=5, logits_soft_cap=30.0)
MODEL = random_model(CONFIG, seed=21)
TOKENS = np.random.default_rng(22).integers(0, CONFIG.vocab_size, (2, 12))  # (B, T)

# The shape of every intermediate, in the letters of the notation legend:
# B batch, T time, D width, E lru width, H heads, K head dim, M MLP width, V vocabulary.
SHAPES = {
    "embeddings": "BTD", "final_norm": "BTD", "logits_before_soft_cap": "BTV",
    "input": "BTD", "temporal_pre_norm": "BTD", "temporal_block": "BTD", "residual": "BTD",
    "channel_pre_norm": "BTD", "mlp.hidden": "BTM", "mlp_block": "BTD", "output": "BTD",
    "linear_y": "BTE", "linear_x": "BTE", "conv1d": "BTE", "rg_lru.gate_x": "BTE",
    "rg_lru.gate_a": "BTE", "rg_lru.a": "BTE", "rg_lru.output": "BTE",
    "queries": "BTHK", "keys": "BTK", "values": "BTK", "attention": "BTD",
}


def forward_with_intermediates(model, tokens, segment_pos=None):
    logits, _, intermediates = model.forward(tokens, segment_pos=segment_pos,
                                             return_intermediates=True)
    return logits, intermediates


def expected_names(config):
    names = set(INTERMEDIATE_NAMES["model"])
    for i, kind in enumerate(config.block_types):
        for name in INTERMEDIATE_NAMES["block"] + INTERMEDIATE_NAMES[kind]:
            names.add(f"blocks.{i}.{name}")
    return names


def name_within_block(name):
    """Strip the block prefix ("blocks.3.rg_lru.a" -> "rg_lru.a") from a block's name."""
    return name.split(".", 2)[2] if name.startswith("blocks.") else name


def weight(model, i, name):
    return model.params[f"model.layers.{i}.{name}"]


def recompute_block(model, i, x, segment_pos):
    """Recompute residual block i from its input x (B, T, D) with rgref.layers alone.

    A fresh sequence: no cache, so the Conv1D and the attention see nothing
    before x. Returns the block's intermediates under their recorded names.
    """
    c = model.config
    B, T, _ = x.shape
    out = {}
    normed = layers.rms_norm(x, weight(model, i, "temporal_pre_norm.weight"), c.rms_norm_eps)
    out["temporal_pre_norm"] = normed
    t = "temporal_block."
    if c.block_types[i] == RECURRENT:
        y = layers.gelu_tanh(layers.linear(normed, weight(model, i, t + "linear_y.weight"),
                                           weight(model, i, t + "linear_y.bias")))
        x_branch = layers.linear(normed, weight(model, i, t + "linear_x.weight"),
                                 weight(model, i, t + "linear_x.bias"))
        conv = layers.conv1d(x_branch, segment_pos, weight(model, i, t + "conv_1d.weight"),
                             weight(model, i, t + "conv_1d.bias"))
        lru, _ = layers.rg_lru(conv, segment_pos,
                               weight(model, i, t + "rg_lru.recurrent_param"),
                               weight(model, i, t + "rg_lru.input_gate_weight"),
                               weight(model, i, t + "rg_lru.input_gate_bias"),
                               weight(model, i, t + "rg_lru.recurrent_gate_weight"),
                               weight(model, i, t + "rg_lru.recurrent_gate_bias"))
        temporal = layers.linear(lru * y, weight(model, i, t + "linear_out.weight"),
                                 weight(model, i, t + "linear_out.bias"))
        out.update({"linear_y": y, "linear_x": x_branch, "conv1d": conv,
                    "rg_lru.output": lru})
    else:
        H, K, S = c.num_heads, c.head_dim, c.attention_window
        queries = layers.linear(normed, weight(model, i, t + "q_proj.weight"))
        queries = layers.apply_rope(queries.reshape(B, T, H, K), segment_pos,
                                    c.rope_max_wavelength)                  # (B, T, H, K)
        keys = layers.linear(normed, weight(model, i, t + "k_proj.weight"))
        keys = layers.apply_rope(keys.reshape(B, T, 1, K), segment_pos,
                                 c.rope_max_wavelength)[:, :, 0]           # (B, T, K)
        values = layers.linear(normed, weight(model, i, t + "v_proj.weight"))  # (B, T, K)
        # local_attention takes the S tokens before the sequence too; none exist.
        no_keys = np.zeros((B, S, K), x.dtype)
        key_valid = np.concatenate([np.zeros((B, S), bool), np.ones((B, T), bool)], axis=1)
        docs = np.cumsum(segment_pos == 0, axis=1)                          # (B, T)
        key_docs = np.concatenate([np.zeros((B, S), docs.dtype), docs], axis=1)
        encoded = layers.local_attention(
            queries, np.concatenate([no_keys, keys], axis=1),
            np.concatenate([no_keys, values], axis=1), key_valid, docs, key_docs, S)
        encoded = encoded.reshape(B, T, H * K)
        temporal = layers.linear(encoded, weight(model, i, t + "o_proj.weight"),
                                 weight(model, i, t + "o_proj.bias"))
        out.update({"queries": queries, "keys": keys, "values": values, "attention": encoded})
    out["temporal_block"] = temporal
    out["residual"] = residual = x + temporal

    normed = layers.rms_norm(residual, weight(model, i, "channel_pre_norm.weight"),
                             c.rms_norm_eps)
    out["channel_pre_norm"] = normed
    m = "mlp_block."
    out["mlp_block"] = layers.mlp_block(
        normed, weight(model, i, m + "gate_proj.weight"), weight(model, i, m + "gate_proj.bias"),
        weight(model, i, m + "up_proj.weight"), weight(model, i, m + "up_proj.bias"),
        weight(model, i, m + "down_proj.weight"), weight(model, i, m + "down_proj.bias"),
        record=out)
    out["output"] = residual + out["mlp_block"]
    return out


# =============================================================================
# Names and shapes
# =============================================================================

def test_shape_table_covers_every_name():
    listed = {name for names in INTERMEDIATE_NAMES.values() for name in names}
    assert listed == set(SHAPES)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_intermediate_names_and_shapes(dtype):
    model = random_model(CONFIG, seed=21, dtype=dtype)
    B, T = TOKENS.shape
    sizes = {"B": B, "T": T, "D": CONFIG.width, "E": CONFIG.lru_width, "H": CONFIG.num_heads,
             "K": CONFIG.head_dim, "M": CONFIG.mlp_width, "V": CONFIG.vocab_size}
    logits, intermediates = forward_with_intermediates(model, TOKENS)
    assert logits.shape == (B, T, CONFIG.vocab_size)
    assert set(intermediates) == expected_names(CONFIG)
    for name, value in intermediates.items():
        letters = SHAPES[name_within_block(name)]
        assert value.shape == tuple(sizes[letter] for letter in letters), name
        assert value.dtype == np.dtype(dtype), name


def test_intermediates_without_request():
    assert len(MODEL.forward(TOKENS)) == 2


@pytest.mark.parametrize("backend", ["numpy", "c"])
def test_last_logits_match_all_logits(backend):
    if backend == "c" and MODEL.resolve_backend("auto") != "c":
        pytest.skip("the C kernels are not built")
    every, _ = MODEL.forward(TOKENS, backend=backend)
    last, cache = MODEL.forward(TOKENS, backend=backend, logits="last")
    assert last.shape == (TOKENS.shape[0], 1, CONFIG.vocab_size)
    if backend == "c":
        # The C linear kernel gives a row the same bits whatever the other rows.
        np.testing.assert_array_equal(last, every[:, -1:])
    else:
        # BLAS may sum a (B, 1, D) and a (B, T, D) matrix product in other orders.
        assert_close(last, every[:, -1:], "same_math_float32", "last logits")
    assert cache.num_tokens == TOKENS.shape[1]


def test_last_logits_intermediates():
    _, _, intermediates = MODEL.forward(TOKENS, logits="last", return_intermediates=True)
    assert intermediates["final_norm"].shape == (TOKENS.shape[0], 1, CONFIG.width)
    assert intermediates["blocks.0.output"].shape == TOKENS.shape + (CONFIG.width,)


def test_invalid_logits_choice():
    with pytest.raises(ValueError, match="logits must be one of"):
        MODEL.forward(TOKENS, logits="first")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_soft_cap_in_place_is_bitwise(dtype):
    logits = np.random.default_rng(5).normal(0, 40, (3, 7)).astype(dtype)
    expected = layers.soft_cap(logits, 30.0)
    in_place = logits.copy()
    layers.soft_cap(in_place, 30.0, out=in_place)
    np.testing.assert_array_equal(in_place, expected)
    uncapped = np.empty_like(logits)
    np.testing.assert_array_equal(layers.soft_cap(logits, None, out=uncapped), logits)


# =============================================================================
# Intermediates agree with each other and with the logits
# =============================================================================

@pytest.mark.parametrize("cap", [30.0, None])
def test_logits_are_soft_capped_logits(cap):
    model = Model(dataclasses.replace(CONFIG, logits_soft_cap=cap), MODEL.params)
    logits, intermediates = forward_with_intermediates(model, TOKENS)
    np.testing.assert_array_equal(logits,
                                  layers.soft_cap(intermediates["logits_before_soft_cap"], cap))
    assert_close(intermediates["logits_before_soft_cap"],
                 layers.unembed(intermediates["final_norm"],
                                MODEL.params["model.embed_tokens.weight"]),
                 "same_math_float32", "unembed(final_norm)")


def test_blocks_chain_from_embeddings_to_final_norm():
    _, intermediates = forward_with_intermediates(MODEL, TOKENS)
    np.testing.assert_array_equal(intermediates["blocks.0.input"], intermediates["embeddings"])
    for i in range(CONFIG.num_blocks - 1):
        np.testing.assert_array_equal(intermediates[f"blocks.{i + 1}.input"],
                                      intermediates[f"blocks.{i}.output"])
    last = intermediates[f"blocks.{CONFIG.num_blocks - 1}.output"]
    assert_close(intermediates["final_norm"],
                 layers.rms_norm(last, MODEL.params["model.final_norm.weight"],
                                 CONFIG.rms_norm_eps),
                 "same_math_float32", "final_norm of the last block output")


def test_embeddings_are_scaled_rows():
    _, intermediates = forward_with_intermediates(MODEL, TOKENS)
    table = MODEL.params["model.embed_tokens.weight"]
    scale = np.float32(layers.embedding_scale(CONFIG.width))
    np.testing.assert_array_equal(intermediates["embeddings"], table[TOKENS] * scale)


def test_residual_sums():
    _, intermediates = forward_with_intermediates(MODEL, TOKENS)
    for i in range(CONFIG.num_blocks):
        block = {name: intermediates[f"blocks.{i}.{name}"]
                 for name in ("input", "temporal_block", "residual", "mlp_block", "output")}
        np.testing.assert_array_equal(block["residual"], block["input"] + block["temporal_block"],
                                      err_msg=f"block {i}: residual")
        np.testing.assert_array_equal(block["output"], block["residual"] + block["mlp_block"],
                                      err_msg=f"block {i}: output")


def test_rg_lru_gates_in_open_unit_interval():
    _, intermediates = forward_with_intermediates(MODEL, TOKENS)
    for i, kind in enumerate(CONFIG.block_types):
        if kind != RECURRENT:
            continue
        for name in ("rg_lru.gate_x", "rg_lru.gate_a", "rg_lru.a"):
            value = intermediates[f"blocks.{i}.{name}"]
            assert value.min() > 0, f"block {i} {name} min {value.min()}"
            assert value.max() < 1, f"block {i} {name} max {value.max()}"


def test_rg_lru_decay_from_recurrence_gate():
    """a = exp(-8 * gate_a * softplus(recurrent_param)), recorded before the document reset."""
    _, intermediates = forward_with_intermediates(MODEL, TOKENS)
    param = weight(MODEL, 0, "temporal_block.rg_lru.recurrent_param")
    gate_a = intermediates["blocks.0.rg_lru.gate_a"]
    assert_close(intermediates["blocks.0.rg_lru.a"],
                 np.exp(-layers.RG_LRU_C * gate_a * layers.softplus(param)),
                 "same_math_float32", "a from gate_a")
    # The same decay in the Griffin paper's form sigmoid(Lambda)^(c r_t), Lambda = -param.
    assert_close(intermediates["blocks.0.rg_lru.a"],
                 layers.sigmoid(-param) ** (layers.RG_LRU_C * gate_a),
                 "same_math_float32", "a = sigmoid(Lambda) ** (8 * gate_a)")


@pytest.mark.parametrize("segment_pos", [None, [[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0, 1]] * 2],
                         ids=["one document", "packed documents"])
def test_blocks_recomputed_from_recorded_input(segment_pos):
    if segment_pos is not None:
        segment_pos = np.array(segment_pos)
    _, intermediates = forward_with_intermediates(MODEL, TOKENS, segment_pos)
    positions = np.broadcast_to(np.arange(TOKENS.shape[1]), TOKENS.shape) \
        if segment_pos is None else segment_pos
    for i, kind in enumerate(CONFIG.block_types):
        recomputed = recompute_block(MODEL, i, intermediates[f"blocks.{i}.input"], positions)
        for name, value in recomputed.items():
            assert_close(value, intermediates[f"blocks.{i}.{name}"], "same_math_float32",
                         f"block {i} ({kind}) {name}")


# =============================================================================
# Saved checkpoints
# =============================================================================

@pytest.mark.parametrize("weights_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("layout", ["huggingface", "official"])
def test_saved_model_reloads_identically(tmp_path, layout, weights_dtype):
    save(MODEL, tmp_path, layout=layout, weights_dtype=weights_dtype)
    names = set(load_safetensors(tmp_path / "model.safetensors"))
    first_name = "embedder.input_embedding" if layout == "official" else \
        "model.embed_tokens.weight"
    assert first_name in names

    if weights_dtype == "bfloat16":
        expected_model = Model(CONFIG, {name: float32_to_bfloat16(value)
                                        for name, value in MODEL.params.items()})
    else:
        expected_model = MODEL
    expected_logits, expected = forward_with_intermediates(expected_model, TOKENS)
    logits, reloaded = forward_with_intermediates(rgref.load(tmp_path), TOKENS)
    np.testing.assert_array_equal(logits, expected_logits)
    for name in expected:
        np.testing.assert_array_equal(reloaded[name], expected[name], err_msg=name)


def test_bfloat16_checkpoint_changes_logits(tmp_path):
    """The bfloat16 case above compares with rounded weights because rounding shows."""
    save(MODEL, tmp_path, weights_dtype="bfloat16")
    departure = np.abs(rgref.load(tmp_path).forward(TOKENS)[0] - MODEL.forward(TOKENS)[0]).max()
    assert departure > 100 * tolerance("same_math_float32")


# =============================================================================
# float64 mode and independence
# =============================================================================

def test_float64_intermediates_agree_with_float32():
    model64 = random_model(CONFIG, seed=21, dtype=np.float64)
    logits64, intermediates64 = forward_with_intermediates(model64, TOKENS)
    logits32, intermediates32 = forward_with_intermediates(MODEL, TOKENS)
    assert_close(logits32, logits64, "float64_vs_float32", "logits")
    for name in intermediates64:
        assert_close(intermediates32[name], intermediates64[name], "float64_vs_float32", name)


def test_models_side_by_side_match_alone():
    """Two models of different configs and dtypes, used in turns, share no state."""
    other_config = Config(vocab_size=50, width=24, mlp_width=32, num_heads=3, lru_width=24,
                          block_types=(ATTENTION, RECURRENT), attention_window=3,
                          embeddings_scale_by_sqrt_dim=False, logits_soft_cap=None)
    prompts = {"first": TOKENS, "second": TOKENS[:, :7] % other_config.vocab_size}
    steps = {"first": [[5], [9]], "second": [[3], [1]]}

    def build(name):
        if name == "first":
            return random_model(CONFIG, seed=21)
        return random_model(other_config, seed=5, dtype=np.float64)

    def run_alone(name):
        model = build(name)
        logits, cache = model.forward(prompts[name])
        outputs = [logits]
        for step in steps[name]:
            logits, cache = model.forward(np.array([step] * 2), cache=cache)
            outputs.append(logits)
        return outputs

    alone = {name: run_alone(name) for name in ("first", "second")}

    models = {name: build(name) for name in ("first", "second")}
    caches = {}
    together = {}
    for name, model in models.items():
        logits, caches[name] = model.forward(prompts[name])
        together[name] = [logits]
    for step in range(2):
        for name, model in models.items():
            logits, caches[name] = model.forward(np.array([steps[name][step]] * 2),
                                                 cache=caches[name])
            together[name].append(logits)

    for name in alone:
        for call, (a, b) in enumerate(zip(together[name], alone[name])):
            np.testing.assert_array_equal(a, b, err_msg=f"{name} model, call {call}")


# =============================================================================
# Decoding next to a document start
# =============================================================================

def left_padded(real_tokens, padding):
    tokens = np.array([[0] * padding + list(real_tokens)])
    segment_pos = np.array([[-1] * padding + list(range(len(real_tokens)))])
    return tokens, segment_pos


@pytest.mark.parametrize("num_real", [1, 2])
def test_decode_after_short_left_padded_prompt(num_real):
    """Decoding after fewer than W - 1 = 3 real tokens gives the one-shot logits.

    The first decoded tokens' Conv1D reaches back into the padding, which the
    document mask must drop in the cached path as it does in the one-shot pass.
    """
    padding, decoded = 3, [7, 11, 13, 17]
    real = [40, 23][:num_real]
    tokens, segment_pos = left_padded(real, padding)
    _, cache = MODEL.forward(tokens, segment_pos=segment_pos)
    steps = []
    for token in decoded:
        logits, cache = MODEL.forward(np.array([[token]]), cache=cache)
        steps.append(logits[0, 0])

    one_shot, _ = MODEL.forward(np.array([real + decoded]))
    assert_close(np.stack(steps), one_shot[0, num_real:], "same_math_float32",
                 f"decoded after {num_real} real tokens")


@pytest.mark.parametrize("num_real", [1, 2])
def test_decode_without_conv1d_mask_differs(num_real):
    """Decoding with no document start in the Conv1D history lets padding leak in.

    This is what the JAX half of recurrentgemma 1.0.1 does: its decode step
    applies no Conv1D document mask to the raw inputs it cached. A cache whose
    Conv1D segment_pos history contains no document start reproduces it, and
    moves the logits far beyond rounding, so the test above can fail.
    """
    tokens, segment_pos = left_padded([40, 23][:num_real], padding=3)
    _, cache = MODEL.forward(tokens, segment_pos=segment_pos)
    masked, _ = MODEL.forward(np.array([[7]]), cache=cache.copy())
    unmasked_cache = cache.copy()
    unmasked_cache.recent_segment_pos[:] = 1
    unmasked, _ = MODEL.forward(np.array([[7]]), cache=unmasked_cache)
    departure = np.abs(masked - unmasked).max()
    assert departure > 100 * tolerance("same_math_float32"), (
        f"hiding the document start from the Conv1D changed the logits by only {departure:g}")


def test_document_start_in_decode_call():
    """A document that starts in a one-token call gives the document's own logits.

    Neither half of recurrentgemma 1.0.1 supports this: its decode step masks
    neither the Conv1D nor the attention by document.
    """
    first, second = [3, 14, 15, 9, 26, 5], [35, 8, 9, 7, 9]
    _, cache = MODEL.forward(np.array([first]))
    steps = []
    for position, token in enumerate(second):
        logits, cache = MODEL.forward(np.array([[token]]), segment_pos=np.array([[position]]),
                                      cache=cache)
        steps.append(logits[0, 0])
    alone, _ = MODEL.forward(np.array([second]))
    assert_close(np.stack(steps), alone[0], "same_math_float32", "second document")


def test_full_causal_attention_departs_past_window():
    """A port that reads the window but never applies it agrees only up to position S.

    Query q attends to keys q - S ... q under the official window and to
    0 ... q with no window: the same keys while q <= S.
    """
    _, [(tokens, segment_pos, expected)] = read_case("forward_past_window")
    windowed = rgref.load(os.path.join(GOLDEN_DIR, "forward_past_window"))
    S, T = windowed.config.attention_window, tokens.shape[1]
    unwindowed = Model(dataclasses.replace(windowed.config, attention_window=T),
                       windowed.params)
    logits, _ = unwindowed.forward(tokens, segment_pos=segment_pos)
    assert_close(logits[:, :S + 1], expected[:, :S + 1], "golden_float32", "positions 0 ... S")
    departure = np.abs(logits[:, S + 1:] - expected[:, S + 1:]).max()
    assert departure > 100 * tolerance("golden_float32"), (
        f"attending past the window changed logits after position S by only {departure:g}")


# =============================================================================
# The example oracle suite
# =============================================================================

def test_example_port_suite_passes():
    """examples/ is outside the default test run, so run its suite here."""
    example = os.path.join(REPO_ROOT, "examples", "test_port_against_rgref.py")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", example],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, (
        f"`python -m pytest {os.path.relpath(example, REPO_ROOT)}` exited with "
        f"{result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-2000:]}")
