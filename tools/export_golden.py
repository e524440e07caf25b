#!/usr/bin/env python3
"""Export golden logits from Google DeepMind's official RecurrentGemma (PyTorch).

Each case builds a small random model with `recurrentgemma.torch.Griffin`
(float32, CPU, eval mode, no gradient checkpointing), runs it on fixed inputs
and writes what rgref must reproduce:

    tests/golden/<case>/config.json        Hugging Face config of the model
    tests/golden/<case>/model.safetensors  parameters under Hugging Face names
    tests/golden/<case>/case.npz           inputs and logits of every call
    tests/golden/<case>/official.safetensors  (official_names only) official names

Run it with the tools environment, which contains PyTorch and `recurrentgemma`:

    make tools-env      # once
    make golden         # = $(REF_PYTHON) tools/export_golden.py --out tests/golden
    .venv-ref/bin/python tools/export_golden.py --out tests/golden --cases packed_documents
    .venv-ref/bin/python tools/export_golden.py --out tests/golden --verify

After writing a case the exporter reloads it from disk into a fresh official
model (through `rgref.safetensors_file` and `rgref.names.hf_to_official`) and
checks that the stored logits come back bit for bit. `--verify` runs only that
check on existing files. Two runs with the same `--out` on the same machine
write identical bytes.

Cases, with B batch, T tokens per call, S attention window, D width, E RG-LRU
width, V vocabulary, R a recurrent block and A an attention block:

  forward_past_window        R,R,A x2, B=2, T=40 with S=8: the window mask and
                             the recurrence far past one window.
  packed_documents           segment_pos restarts at 0 mid-row, at different
                             points per row, with documents of length 1 and 2:
                             RG-LRU reset, Conv1D document mask, attention
                             document mask and per-document RoPE positions.
  left_padded_batch          rows of different lengths, left padded with token 0
                             and segment_pos -1: whether padding leaks into the
                             logits of real tokens.
  decode_short_prefill       5-token prompt (< S), then 30 single-token decode
                             calls: the KV ring buffer filling and wrapping.
  decode_long_prefill        20-token prompt (2.5 windows), then 20 decode calls:
                             the cache built from a prompt longer than S.
  decode_left_padded         left-padded prompts of 9 and 5 real tokens, then
                             12 decode calls with per-row positions.
  lru_width_differs          E=48 != D=32, forward then 4 decode calls.
  hawk_all_recurrent         every block recurrent, 32-token prompt then 12
                             decode calls: recurrent caches without attention.
  paper_preset_no_cap_no_scale  no embedding scale and no logit soft cap, as in
                             the griffin-7b and hawk-7b paper presets.
  sqrt_width_not_bfloat16    D=40: sqrt(40)=6.3246 rounds to 6.3125 in bfloat16,
                             and the official model multiplies by the rounded value.
  bfloat16_weights           parameters rounded to bfloat16 and stored as BF16,
                             with the official model run in float32 on them.
  official_names             also stores the official `blocks.N...` state dict,
                             names and shapes unchanged, for the loader.

The official initialization sets every bias and norm scale to zero, so a golden
case built from it could not catch a missing bias. Every parameter is therefore
randomized (see `randomize_parameters`).

This tool needs PyTorch and `recurrentgemma`, which the `rgref` package never imports.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import io
import json
import math
import os
import shutil
import sys
import zipfile
from typing import Callable

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from rgref import names  # noqa: E402
from rgref.config import ATTENTION, RECURRENT, Config  # noqa: E402
from rgref.dtypes import bfloat16_to_float32, float32_to_bfloat16, is_bfloat16  # noqa: E402
from rgref.safetensors_file import load_safetensors, save_safetensors  # noqa: E402

try:
    import torch
    from recurrentgemma import common as rg_common
    from recurrentgemma.torch import griffin as rg_griffin
except ImportError as error:
    sys.exit(f"export_golden.py needs PyTorch and the official recurrentgemma package, "
             f"which are not importable here ({error}).\n"
             "Create the tools environment with `make tools-env`, then run `make golden` "
             "(or run this script with that environment's python).")

REFERENCE_PACKAGE = "recurrentgemma"
REGENERATE_COMMAND = "make golden"
DEFAULT_OUT = os.path.join("tests", "golden")

# Standard deviations of the random parameters. The official init draws the
# weight matrices and a_param but sets biases and norm scales to zero. It draws
# the Conv1D taps with std 0.05, so small that reversed taps would hardly show.
BIAS_STD = 0.1
NORM_SCALE_STD = 0.3
CONV_WEIGHT_STD = 0.5
A_PARAM_NOISE_STD = 0.1
# The official embedding std is 1/sqrt(D), which gives logits of std ~1, where
# a soft cap of 30 hardly bends them. This gain spreads the logits to std ~3.
# The blocks' output projections get the same gain, so that the blocks add as
# much to the residual stream as the scaled embedding contributes.
EMBEDDING_GAIN = 3.0
BLOCK_OUTPUT_GAIN = 3.0


# ================================================================== cases

@dataclasses.dataclass(frozen=True)
class Call:
    """Inputs of one model call: token ids and segment_pos, both (B, T) int32.

    Real tokens are drawn from 1 .. V - 1, so token 0 appears only as padding.
    """

    tokens: np.ndarray
    segment_pos: np.ndarray


def contiguous_prompt(rng: np.random.Generator, vocab_size: int, batch: int,
                      length: int) -> Call:
    """Build one document per row, positions 0 .. length - 1."""
    segment_pos = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length))
    tokens = rng.integers(1, vocab_size, size=(batch, length), dtype=np.int32)
    return Call(tokens, np.ascontiguousarray(segment_pos))


def packed_prompt(rng: np.random.Generator, vocab_size: int,
                  document_lengths: list[list[int]]) -> Call:
    """Pack documents into rows: segment_pos restarts at 0 where each document starts."""
    rows = [np.concatenate([np.arange(n, dtype=np.int32) for n in lengths])
            for lengths in document_lengths]
    if len({len(row) for row in rows}) != 1:
        raise ValueError(f"packed rows must have equal lengths, got {[len(r) for r in rows]}")
    segment_pos = np.stack(rows)
    tokens = rng.integers(1, vocab_size, size=segment_pos.shape, dtype=np.int32)
    return Call(tokens, segment_pos)


def left_padded_prompt(rng: np.random.Generator, vocab_size: int, real_lengths: list[int],
                       length: int) -> Call:
    """Left-pad rows as the official sampler does: pad token 0 at segment_pos -1."""
    batch = len(real_lengths)
    tokens = rng.integers(1, vocab_size, size=(batch, length), dtype=np.int32)
    segment_pos = np.full((batch, length), -1, dtype=np.int32)
    for row, n in enumerate(real_lengths):
        tokens[row, :length - n] = 0
        segment_pos[row, length - n:] = np.arange(n, dtype=np.int32)
    return Call(tokens, segment_pos)


@dataclasses.dataclass(frozen=True)
class Case:
    """One golden case: a model, its first call and the decode calls after it.

    Attributes:
      name: Directory name under the output directory.
      description: One sentence stating what the case checks.
      seed: Seeds torch (official init) and NumPy (extra noise and inputs).
      official_config: The model, as the official `GriffinConfig`.
      make_prompt: Builds the first call's inputs from the NumPy generator and V.
      decode_steps: Single-token calls after the prompt, each continuing the
        cache of the call before it. The official model accepts only one token
        per call once a cache exists.
      weights_dtype: "float32", or "bfloat16" to round every parameter to
        bfloat16 before the model runs (still in float32 arithmetic).
      write_official_names: Also write `official.safetensors` in the official
        state dict layout.
      notes: Extra facts stored in the metadata.
    """

    name: str
    description: str
    seed: int
    official_config: "rg_common.GriffinConfig"
    make_prompt: Callable[[np.random.Generator, int], Call]
    decode_steps: int = 0
    weights_dtype: str = "float32"
    write_official_names: bool = False
    notes: tuple[str, ...] = ()


R = rg_common.TemporalBlockType.RECURRENT
A = rg_common.TemporalBlockType.ATTENTION


def griffin_config(*, width=32, mlp_width=64, num_heads=2, lru_width=None, blocks=(R, R, A),
                   window=8, vocab_size=128, scale_by_sqrt_dim=True,
                   soft_cap=30.0) -> "rg_common.GriffinConfig":
    return rg_common.GriffinConfig(
        vocab_size=vocab_size,
        width=width,
        mlp_expanded_width=mlp_width,
        num_heads=num_heads,
        block_types=tuple(blocks),
        embeddings_scale_by_sqrt_dim=scale_by_sqrt_dim,
        attention_window_size=window,
        logits_soft_cap=soft_cap,
        lru_width=lru_width or width,
    )


PADDED_LOGITS_NOTE = ("Logits at padded positions (segment_pos -1) are stored as the official "
                      "model computed them, but they carry no meaning. Compare only positions "
                      "with segment_pos >= 0.")

CASES = [
    Case(
        name="forward_past_window",
        description="A forward pass of 40 tokens with attention window 8, pattern R,R,A twice.",
        seed=1001,
        official_config=griffin_config(vocab_size=256, blocks=(R, R, A) * 2, window=8),
        make_prompt=lambda rng, v: contiguous_prompt(rng, v, batch=2, length=40),
    ),
    Case(
        name="packed_documents",
        description="Several documents packed per row, restarting segment_pos at 0 at "
                    "different points per row, including documents of length 1 and 2.",
        seed=1002,
        official_config=griffin_config(num_heads=4, window=8),
        make_prompt=lambda rng, v: packed_prompt(rng, v, [[5, 1, 2, 11, 5], [2, 9, 1, 3, 9]]),
    ),
    Case(
        name="left_padded_batch",
        description="Rows with 20, 12 and 2 real tokens, left padded with token 0 at "
                    "segment_pos -1.",
        seed=1003,
        official_config=griffin_config(window=8),
        make_prompt=lambda rng, v: left_padded_prompt(rng, v, [20, 12, 2], length=20),
        notes=(PADDED_LOGITS_NOTE,),
    ),
    Case(
        name="decode_short_prefill",
        description="A 5-token prompt, shorter than the window of 8, then 30 single-token "
                    "decode calls.",
        seed=1004,
        official_config=griffin_config(window=8),
        make_prompt=lambda rng, v: contiguous_prompt(rng, v, batch=2, length=5),
        decode_steps=30,
    ),
    Case(
        name="decode_long_prefill",
        description="A 20-token prompt, 2.5 times the window of 8, then 20 single-token "
                    "decode calls.",
        seed=1005,
        official_config=griffin_config(window=8),
        make_prompt=lambda rng, v: contiguous_prompt(rng, v, batch=2, length=20),
        decode_steps=20,
    ),
    Case(
        name="decode_left_padded",
        description="Prompts of 9 and 5 real tokens left padded to 9, then 12 decode calls "
                    "whose segment_pos continues per row.",
        seed=1006,
        official_config=griffin_config(window=8),
        make_prompt=lambda rng, v: left_padded_prompt(rng, v, [9, 5], length=9),
        decode_steps=12,
        notes=(
            PADDED_LOGITS_NOTE,
            "The JAX decode step of recurrentgemma 1.0.1 applies no Conv1D document mask, "
            "so after a prompt with fewer than 3 real tokens it mixes padding into the "
            "first decode steps (the PyTorch one does not: its prompt pass zeroes the "
            "cached inputs before a document start). Every prompt here has at least 4 "
            "real tokens, so both agree.",
        ),
    ),
    Case(
        name="lru_width_differs",
        description="RG-LRU width 48 with model width 32: a 12-token prompt, then 4 decode "
                    "calls.",
        seed=1007,
        official_config=griffin_config(num_heads=4, lru_width=48, window=8),
        make_prompt=lambda rng, v: contiguous_prompt(rng, v, batch=2, length=12),
        decode_steps=4,
    ),
    Case(
        name="hawk_all_recurrent",
        description="Four recurrent blocks and no attention: a 32-token prompt, then 12 "
                    "decode calls.",
        seed=1008,
        official_config=griffin_config(blocks=(R,) * 4, window=8),
        make_prompt=lambda rng, v: contiguous_prompt(rng, v, batch=2, length=32),
        decode_steps=12,
    ),
    Case(
        name="paper_preset_no_cap_no_scale",
        description="No sqrt(width) embedding scale and no logit soft cap, as the griffin-7b "
                    "and hawk-7b paper presets.",
        seed=1009,
        official_config=griffin_config(window=8, scale_by_sqrt_dim=False, soft_cap=0.0),
        make_prompt=lambda rng, v: contiguous_prompt(rng, v, batch=2, length=16),
    ),
    Case(
        name="sqrt_width_not_bfloat16",
        description="Width 40, whose embedding scale sqrt(40) changes when rounded to "
                    "bfloat16 as the official model does.",
        seed=1010,
        official_config=griffin_config(width=40, mlp_width=80, window=8),
        make_prompt=lambda rng, v: contiguous_prompt(rng, v, batch=2, length=12),
    ),
    Case(
        name="bfloat16_weights",
        description="Every parameter rounded to bfloat16 and stored as BF16, with the "
                    "official model run in float32 on the rounded values.",
        seed=1011,
        official_config=griffin_config(window=8),
        make_prompt=lambda rng, v: contiguous_prompt(rng, v, batch=2, length=16),
        weights_dtype="bfloat16",
    ),
    Case(
        name="official_names",
        description="The same model stored twice: model.safetensors with Hugging Face names "
                    "and official.safetensors with the official state dict names and shapes.",
        seed=1012,
        official_config=griffin_config(window=8),
        make_prompt=lambda rng, v: contiguous_prompt(rng, v, batch=2, length=12),
        write_official_names=True,
    ),
]
CASES_BY_NAME = {case.name: case for case in CASES}


# ======================================================== official model

def rgref_config(official: "rg_common.GriffinConfig") -> Config:
    """Return the rgref Config with the hyperparameters of an official GriffinConfig."""
    kinds = {R: RECURRENT, A: ATTENTION}
    return Config(
        vocab_size=official.vocab_size,
        width=official.width,
        mlp_width=official.mlp_expanded_width,
        num_heads=official.num_heads,
        lru_width=official.lru_width or official.width,
        block_types=tuple(kinds[kind] for kind in official.block_types),
        attention_window=official.attention_window_size,
        # The official Conv1D width and RMSNorm eps are constructor defaults
        # that GriffinConfig does not carry: 4 and 1e-6.
        conv1d_width=4,
        embeddings_scale_by_sqrt_dim=official.embeddings_scale_by_sqrt_dim,
        # A cap of 0.0 means no cap in the official config and None in rgref.
        logits_soft_cap=official.logits_soft_cap or None,
        rms_norm_eps=1e-6,
    )


def official_config(config: Config) -> "rg_common.GriffinConfig":
    """Return the official GriffinConfig for an rgref Config (the inverse of `rgref_config`)."""
    kinds = {RECURRENT: R, ATTENTION: A}
    if config.conv1d_width != 4 or config.rms_norm_eps != 1e-6:
        raise ValueError(f"the official model supports only conv1d_width 4 and rms_norm_eps "
                         f"1e-6, got {config.conv1d_width} and {config.rms_norm_eps}")
    return rg_common.GriffinConfig(
        vocab_size=config.vocab_size,
        width=config.width,
        mlp_expanded_width=config.mlp_width,
        num_heads=config.num_heads,
        block_types=tuple(kinds[kind] for kind in config.block_types),
        embeddings_scale_by_sqrt_dim=config.embeddings_scale_by_sqrt_dim,
        attention_window_size=config.attention_window,
        logits_soft_cap=config.logits_soft_cap or 0.0,
        lru_width=config.lru_width,
    )


def new_official_model(config: "rg_common.GriffinConfig") -> "rg_griffin.Griffin":
    model = rg_griffin.Griffin(config, gradient_checkpointing=False, device="cpu",
                               dtype=torch.float32)
    return model.eval()


def randomize_parameters(model: "rg_griffin.Griffin", rng: np.random.Generator) -> None:
    """Randomize every parameter, starting from the official init.

    Biases (the Conv1D and RG-LRU gate biases included) and RMSNorm scales get
    fresh normal draws because the official init zeroes them. The Conv1D taps
    are redrawn wider than the official init so that each tap matters. The
    embedding and the blocks' output projections keep their official draws,
    scaled by the gains above. a_param keeps its official init plus small
    noise, so the decays a = exp(-8 * gate_a * softplus(a_param)) stay close
    to 1 and the recurrence remembers tokens for tens of steps.
    """
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            def draw(std: float) -> torch.Tensor:
                return torch.from_numpy(rng.normal(0.0, std, parameter.shape).astype(np.float32))

            if name.endswith("pre_norm.scale") or name == "final_norm.scale":
                parameter.copy_(draw(NORM_SCALE_STD))
            elif name.endswith("conv_1d.w"):
                parameter.copy_(draw(CONV_WEIGHT_STD))
            elif name.endswith("rg_lru.a_param"):
                parameter.add_(draw(A_PARAM_NOISE_STD))
            elif name.endswith((".bias", ".b")):
                parameter.copy_(draw(BIAS_STD))
            elif name == "embedder.input_embedding":
                parameter.mul_(EMBEDDING_GAIN)
            elif name.endswith(("linear_out.weight", "proj_final.weight", "ffw_down.weight")):
                parameter.mul_(BLOCK_OUTPUT_GAIN)


def round_parameters_to_bfloat16(model: "rg_griffin.Griffin") -> None:
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.to(torch.bfloat16).to(torch.float32))


def official_state_dict(model: "rg_griffin.Griffin") -> dict[str, np.ndarray]:
    """Return the model's state dict as float32 NumPy arrays, official names and shapes."""
    return {name: tensor.detach().numpy().copy() for name, tensor in model.state_dict().items()}


def run_calls(model: "rg_griffin.Griffin", calls: list[Call]) -> list[np.ndarray]:
    """Run the calls in order, each continuing the cache of the one before; return logits.

    The first call starts from no cache. Returns one float32 (B, T, V) array per call.
    """
    logits_per_call = []
    cache = None
    with torch.no_grad():
        for call in calls:
            tokens = torch.from_numpy(call.tokens)
            segment_pos = torch.from_numpy(call.segment_pos)
            logits, cache = model(tokens, segment_pos, cache=cache)
            logits_per_call.append(logits.numpy().astype(np.float32, copy=True))
    return logits_per_call


def decode_calls(prompt: Call, steps: int, rng: np.random.Generator,
                 vocab_size: int) -> list[Call]:
    """Draw single-token decode calls whose segment_pos continues each row's prompt."""
    calls = []
    last_position = prompt.segment_pos[:, -1]
    batch = prompt.tokens.shape[0]
    for step in range(1, steps + 1):
        tokens = rng.integers(1, vocab_size, size=(batch, 1), dtype=np.int32)
        segment_pos = (last_position + step).astype(np.int32)[:, None]
        calls.append(Call(tokens, segment_pos))
    return calls


# ================================================================ writing

def write_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Write a compressed .npz readable by `np.load`, with fixed zip timestamps.

    `np.savez_compressed` stamps each member with the current time, so two
    exports would differ in bytes. This writes the same members (.npy files in
    a deflated zip) with a constant date instead.
    """
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for key, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asarray(array), allow_pickle=False)
            member = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            member.compress_type = zipfile.ZIP_DEFLATED
            member.external_attr = 0o644 << 16
            archive.writestr(member, buffer.getvalue())


def max_logit_change_with_exact_scale(model: "rg_griffin.Griffin", calls: list[Call],
                                      reference: list[np.ndarray]) -> float:
    """Return how far the logits move if the embedding scale is not rounded to bfloat16.

    Runs the official model again with sqrt(width) rounded to float32 instead,
    which shows how large an error from a missing rounding this case can catch.
    """
    embedder = model.embedder
    exact = math.sqrt(embedder.embed_dim)

    def encode_with_exact_scale(x):
        return embedder.input_embedding[(x,)] * exact

    original = embedder.encode
    embedder.encode = encode_with_exact_scale
    try:
        changed = run_calls(model, calls)
    finally:
        embedder.encode = original
    return max(float(np.max(np.abs(a - b))) for a, b in zip(changed, reference))


def export_case(case: Case, out_dir: str, command: str) -> str:
    """Build, run and write one case; return its directory."""
    torch.manual_seed(case.seed)
    rng = np.random.default_rng(case.seed)
    config = rgref_config(case.official_config)
    if official_config(config) != case.official_config:
        raise AssertionError(f"{case.name}: the official and rgref configs do not round-trip")

    model = new_official_model(case.official_config)
    randomize_parameters(model, rng)
    if case.weights_dtype == "bfloat16":
        round_parameters_to_bfloat16(model)

    prompt = case.make_prompt(rng, config.vocab_size)
    calls = [prompt] + decode_calls(prompt, case.decode_steps, rng, config.vocab_size)
    logits = run_calls(model, calls)

    official = official_state_dict(model)
    hf = names.official_to_hf(official)
    expected = names.expected_shapes(config)
    shapes = {name: tuple(array.shape) for name, array in hf.items()}
    if shapes != expected:
        raise AssertionError(f"{case.name}: converted tensors do not match "
                             f"rgref.names.expected_shapes: {sorted(set(shapes) ^ set(expected))}")
    if case.weights_dtype == "bfloat16":
        hf = {name: float32_to_bfloat16(array) for name, array in hf.items()}

    metadata = {
        "reference": {
            "package": REFERENCE_PACKAGE,
            "version": importlib.metadata.version(REFERENCE_PACKAGE),
            "model": "recurrentgemma.torch.Griffin, float32, CPU, eval mode, "
                     "gradient_checkpointing=False, torch.no_grad",
        },
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "seed": case.seed,
        "case": case.name,
        "description": case.description,
        "dtype": "float32",
        "weights_dtype": case.weights_dtype,
        "command": command,
        "regenerate": REGENERATE_COMMAND,
        "parameter_randomization": {
            "bias_std": BIAS_STD, "norm_scale_std": NORM_SCALE_STD,
            "conv_weight_std": CONV_WEIGHT_STD, "a_param_noise_std": A_PARAM_NOISE_STD,
            "embedding_gain": EMBEDDING_GAIN, "block_output_gain": BLOCK_OUTPUT_GAIN},
        "config": config.to_hf_config(),
        "notes": list(case.notes),
    }
    if config.embeddings_scale_by_sqrt_dim:
        exact = math.sqrt(config.width)
        metadata["embedding_scale"] = {
            "exact": exact,
            "bfloat16": float(torch.tensor(exact).type(torch.bfloat16)),
            "max_abs_logit_change_with_exact_scale":
                max_logit_change_with_exact_scale(model, calls, logits),
        }

    case_dir = os.path.join(out_dir, case.name)
    if os.path.isdir(case_dir):
        shutil.rmtree(case_dir)
    os.makedirs(case_dir)
    with open(os.path.join(case_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config.to_hf_config(), f, indent=2)
        f.write("\n")
    save_safetensors(os.path.join(case_dir, "model.safetensors"), hf)
    if case.write_official_names:
        save_safetensors(os.path.join(case_dir, "official.safetensors"), official)

    arrays: dict[str, np.ndarray] = {
        "metadata": np.array(json.dumps(metadata, indent=1, sort_keys=True)),
        "num_calls": np.array(len(calls), dtype=np.int32),
    }
    for i, (call, call_logits) in enumerate(zip(calls, logits)):
        arrays[f"call{i}_tokens"] = call.tokens.astype(np.int32)
        arrays[f"call{i}_segment_pos"] = call.segment_pos.astype(np.int32)
        arrays[f"call{i}_logits"] = call_logits
    write_npz(os.path.join(case_dir, "case.npz"), arrays)
    return case_dir


# ============================================================ verification

class GoldenMismatch(AssertionError):
    """Files of a golden case that do not reproduce their stored logits."""


def load_float32(path: str) -> dict[str, np.ndarray]:
    """Read a safetensors file as float32 arrays, widening BF16 exactly."""
    arrays = {}
    for name, array in load_safetensors(path).items():
        arrays[name] = bfloat16_to_float32(array) if is_bfloat16(array) else np.array(array)
    return arrays


def verify_case(case_dir: str) -> str:
    """Rebuild the official model from the files in `case_dir` and rerun the stored calls.

    Raises GoldenMismatch unless every call's logits equal the stored ones bit
    for bit. Returns a one-line summary.
    """
    config = Config.from_json_file(os.path.join(case_dir, "config.json"))
    with np.load(os.path.join(case_dir, "case.npz"), allow_pickle=False) as data:
        metadata = json.loads(str(data["metadata"]))
        num_calls = int(data["num_calls"])
        calls = [Call(data[f"call{i}_tokens"], data[f"call{i}_segment_pos"])
                 for i in range(num_calls)]
        stored = [data[f"call{i}_logits"] for i in range(num_calls)]

    hf_weights = load_safetensors(os.path.join(case_dir, "model.safetensors"))
    expected_dtype = np.uint16 if metadata["weights_dtype"] == "bfloat16" else np.float32
    for name, array in hf_weights.items():
        if array.dtype != expected_dtype:
            raise GoldenMismatch(f"{case_dir}: tensor {name} has dtype {array.dtype}, expected "
                                 f"{np.dtype(expected_dtype)} for {metadata['weights_dtype']}")
    shapes = {name: tuple(array.shape) for name, array in hf_weights.items()}
    if shapes != names.expected_shapes(config):
        raise GoldenMismatch(f"{case_dir}: model.safetensors does not have the tensors that "
                             "rgref.names.expected_shapes lists for config.json")

    weight_files = {"model.safetensors": names.hf_to_official}
    if os.path.exists(os.path.join(case_dir, "official.safetensors")):
        weight_files["official.safetensors"] = dict
    for file_name, to_official in weight_files.items():
        weights = to_official(load_float32(os.path.join(case_dir, file_name)))
        state_dict = {name: torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
                      for name, array in weights.items()}
        model = new_official_model(official_config(config))
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as error:
            raise GoldenMismatch(f"{case_dir}: {file_name} does not load into the official "
                                 f"model: {error}") from None
        rerun = run_calls(model, calls)
        # NOTE: exact equality holds on the machine that exported the files.
        # Another CPU or torch build may round the last bits differently.
        for i, (a, b) in enumerate(zip(rerun, stored)):
            if a.shape != b.shape:
                raise GoldenMismatch(f"{case_dir}: call {i} logits have shape {a.shape} from "
                                     f"{file_name} but {b.shape} in case.npz")
            if not np.array_equal(a, b):
                raise GoldenMismatch(
                    f"{case_dir}: call {i} logits from {file_name} differ from case.npz by up "
                    f"to {float(np.max(np.abs(a - b))):.3g}; regenerate with "
                    f"`{REGENERATE_COMMAND}` (files exported on another CPU or torch build "
                    "can differ in the last bits)")
    shape_text = ", ".join(f"{tuple(x.shape)}" for x in stored[:2])
    if num_calls > 2:
        shape_text += f", ... ({num_calls} calls)"
    verb = "reproduce" if len(weight_files) > 1 else "reproduces"
    return f"{' and '.join(weight_files)} {verb} logits {shape_text} exactly"


# ================================================================ README

def readme_text(version: str) -> str:
    rows = []
    for case in CASES:
        calls = 1 + case.decode_steps
        rows.append(f"| `{case.name}` | {calls} | {case.weights_dtype} | {case.description} |")
    table = "\n".join(rows)
    return f"""# Golden cases from the official RecurrentGemma

Logits of small random models, computed by Google DeepMind's `recurrentgemma`
{version} (`recurrentgemma.torch.Griffin`, float32 on CPU). rgref's tests
compare against them. These files are generated, so do not edit them by hand.
Regenerate them with

    {REGENERATE_COMMAND}

which runs `$(REF_PYTHON) tools/export_golden.py --out tests/golden` in the
tools environment that `make tools-env` creates. The exporter's docstring
describes what each case checks. After writing a case, the exporter loads its
files into a fresh official model and checks that the stored logits come back
bit for bit. `tools/export_golden.py --verify` repeats that check on existing
files.

| case | calls | weights | what it checks |
|---|---|---|---|
{table}

## Files in each case directory

- `config.json`: the Hugging Face `config.json` of the model, which rgref
  reads with `Config.from_json_file`.
- `model.safetensors`: every parameter under its Hugging Face name, in
  float32 (BF16 in `bfloat16_weights`).
- `official.safetensors` (`official_names` only): the same parameters under
  the official `recurrentgemma` state dict names and shapes.
- `case.npz`:
  - `metadata`: a 0-d string array that contains JSON: the reference package
    and version, torch and NumPy versions, seed, description, dtypes, the
    config, the parameter randomization, the embedding scale (exact and
    rounded to bfloat16), the exporter command and notes.
  - `num_calls`, then for each call `i`: `call{{i}}_tokens` int32 (B, T),
    `call{{i}}_segment_pos` int32 (B, T) and `call{{i}}_logits` float32
    (B, T, V). Call 0 starts without a cache. Each later call continues the
    cache returned by the call before it. The official model accepts one
    token per call once a cache exists, so decode calls have T = 1.

Every parameter is random. Biases and RMSNorm scales are drawn from normal
distributions because the official initialization sets them to zero, which
would hide a missing bias. Token 0 appears only as padding. In rows with left
padding (segment_pos -1), the logits at padded positions carry no meaning, so
compare only positions with segment_pos >= 0.
"""


# ================================================================== main

def command_line(out_dir: str) -> str:
    """Return the export command with the output directory relative to the repository.

    Stored in the metadata. `--cases` is left out because a case's files do
    not depend on which other cases ran.
    """
    out = os.path.relpath(os.path.abspath(out_dir), REPO_ROOT)
    return f"python tools/export_golden.py --out {out}"


def sha256_of(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:12]


def directory_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, name)) for name in os.listdir(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Export golden logits from the official recurrentgemma PyTorch model.")
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, DEFAULT_OUT),
                        help="output directory, one subdirectory per case "
                             "(default: tests/golden in the repository)")
    parser.add_argument("--cases", default=None,
                        help="comma-separated case names to export or verify (default: all); "
                             f"known: {', '.join(CASES_BY_NAME)}")
    parser.add_argument("--verify", action="store_true",
                        help="only check existing files: rebuild the official model from each "
                             "case's files and compare its logits with case.npz")
    args = parser.parse_args(argv)

    if args.cases is None:
        selected = CASES
    else:
        requested = [name.strip() for name in args.cases.split(",") if name.strip()]
        unknown = [name for name in requested if name not in CASES_BY_NAME]
        if unknown:
            parser.error(f"unknown case {', '.join(unknown)}; known cases: "
                         f"{', '.join(CASES_BY_NAME)}")
        selected = [CASES_BY_NAME[name] for name in requested]

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    version = importlib.metadata.version(REFERENCE_PACKAGE)
    print(f"reference: {REFERENCE_PACKAGE} {version}, torch {torch.__version__}, "
          f"numpy {np.__version__}", file=sys.stderr)

    failures = 0
    for index, case in enumerate(selected, 1):
        prefix = f"[{index}/{len(selected)}] {case.name}:"
        case_dir = os.path.join(args.out, case.name)
        try:
            if not args.verify:
                export_case(case, args.out, command_line(args.out))
            summary = verify_case(case_dir)
        except GoldenMismatch as error:
            failures += 1
            print(f"{prefix} FAILED: {error}", file=sys.stderr)
            continue
        except FileNotFoundError as error:
            failures += 1
            print(f"{prefix} FAILED: {error}; export it with `{REGENERATE_COMMAND}`",
                  file=sys.stderr)
            continue
        size = directory_size(case_dir)
        digest = sha256_of(os.path.join(case_dir, "case.npz"))
        print(f"{prefix} {summary}; {size / 1024:.0f} KiB, case.npz sha256 {digest}",
              file=sys.stderr)

    if not args.verify:
        with open(os.path.join(args.out, "README.md"), "w", encoding="utf-8") as f:
            f.write(readme_text(version))
    if failures:
        print(f"{failures} of {len(selected)} cases failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
