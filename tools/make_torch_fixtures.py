"""Write the PyTorch checkpoint fixtures in tests/data/torch/ (needs torch and recurrentgemma).

Each `NAME.pt` is written by torch.save, and `NAME.npz` contains the values torch
reads back from it: float32, float16 and float64 tensors as themselves, bfloat16
as uint16 bits, plus a `metadata` entry (JSON: generator, versions, seed). The
tests read the `.pt` files with rgref, without torch, and compare exactly.

  mixed.pt         plain dict: every supported dtype, a scalar, an empty tensor,
                   an nn.Parameter, and views that share one storage (a
                   transpose, a column slice, a row at an offset)
  griffin_tiny.pt  Module.state_dict() (an OrderedDict with `_metadata`) of an
                   official recurrentgemma.torch.Griffin with every parameter
                   random, in bfloat16 as the released weights
  griffin_tiny_logits.npz  the official float32 logits of that model (its
                   bfloat16 weights widened) for a few tokens
  int64.pt         an int64 tensor, which rgref rejects by dtype
  legacy.pt        the pre-zip torch.save format, which rgref rejects

Run from the repository root with the environment `make tools-env` creates:
  .venv-ref/bin/python tools/make_torch_fixtures.py --out tests/data/torch
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from importlib.metadata import version

SEED = 0

# The tiny official model: width 16, 2 heads of 8, LRU width 24 and MLP width 40
# (neither a multiple of the width, so a wrong inference shows), blocks R, R, A, R.
# Window, soft cap and embedding scale are those of the recurrentgemma-2b preset,
# which the tests pass when they infer its config from the shapes.
GRIFFIN_TINY = dict(vocab_size=32, width=16, mlp_expanded_width=40, num_heads=2, lru_width=24,
                    block_types=("recurrent", "recurrent", "attention", "recurrent"),
                    embeddings_scale_by_sqrt_dim=True, attention_window_size=2048,
                    logits_soft_cap=30.0)
# Tokens whose official logits are stored, one sequence with positions 0, 1, ...
GRIFFIN_TINY_TOKENS = [[2, 17, 5, 30, 9, 1]]


def expected_array(tensor: torch.Tensor) -> np.ndarray:
    """Return the values of `tensor` as a NumPy array, bfloat16 as uint16 bits."""
    tensor = tensor.detach().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16).copy()
    return tensor.numpy().copy()


def save_fixture(directory: str, name: str, state_dict, metadata: dict) -> None:
    path = os.path.join(directory, name + ".pt")
    torch.save(state_dict, path)
    # Read the file back with torch so the expected values are what torch loads.
    loaded = torch.load(path, weights_only=True)
    arrays = {key: expected_array(value) for key, value in loaded.items()}
    full_metadata = {"generator": "tools/make_torch_fixtures.py", "torch": torch.__version__,
                     "seed": SEED, **metadata}
    arrays["metadata"] = np.array(json.dumps(full_metadata, sort_keys=True))
    np.savez_compressed(os.path.join(directory, name + ".npz"), **arrays)
    print(f"wrote {path} ({os.path.getsize(path)} bytes), {len(loaded)} tensors")


def mixed_state_dict() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(SEED)
    base = torch.randn(4, 6, generator=generator)
    return {
        "float32": torch.randn(3, 5, generator=generator),
        "bfloat16": torch.randn(4, 3, generator=generator).to(torch.bfloat16),
        "float16": torch.randn(7, generator=generator).to(torch.float16),
        "float64": torch.randn(2, 2, generator=generator, dtype=torch.float64),
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 5),
        "parameter": torch.nn.Parameter(torch.randn(2, 3, generator=generator)),
        # Four tensors that share one storage of 24 floats.
        "shared.base": base,
        "shared.transpose": base.t(),            # stride (1, 6)
        "shared.columns": base[1:3, 2:5],        # offset 8, stride (6, 1)
        "shared.row": base[2],                   # contiguous, offset 12
    }


def griffin_model():
    """Return the tiny official Griffin in float32, every parameter random."""
    from recurrentgemma import torch as recurrentgemma_torch

    torch.manual_seed(SEED)
    config = recurrentgemma_torch.GriffinConfig(
        **{**GRIFFIN_TINY, "block_types": tuple(
            recurrentgemma_torch.TemporalBlockType[kind.upper()]
            for kind in GRIFFIN_TINY["block_types"])})
    model = recurrentgemma_torch.Griffin(config, dtype=torch.float32)
    # The official init zeroes biases and norm scales; random values everywhere
    # make a misplaced tensor visible.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.5)
    return model


def save_griffin_logits(directory: str, model, state_dict) -> None:
    """Store the official float32 logits of the model with the saved bfloat16 weights."""
    model.load_state_dict({name: value.float() for name, value in state_dict.items()})
    tokens = torch.tensor(GRIFFIN_TINY_TOKENS)
    segment_pos = torch.arange(tokens.shape[1])[None].expand_as(tokens)
    with torch.no_grad():
        logits, _ = model(tokens, segment_pos)
    metadata = {"generator": "tools/make_torch_fixtures.py", "torch": torch.__version__,
                "recurrentgemma": version("recurrentgemma"), "seed": SEED,
                "config": GRIFFIN_TINY, "weights": "griffin_tiny.pt widened to float32",
                "compute_dtype": "float32"}
    path = os.path.join(directory, "griffin_tiny_logits.npz")
    np.savez_compressed(path, tokens=tokens.numpy(), logits=logits.numpy(),
                        metadata=np.array(json.dumps(metadata, sort_keys=True)))
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/data/torch", help="output directory")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)

    save_fixture(args.out, "mixed", mixed_state_dict(), {})
    model = griffin_model()
    state_dict = model.to(torch.bfloat16).state_dict()
    save_fixture(args.out, "griffin_tiny", state_dict,
                 {"recurrentgemma": version("recurrentgemma"), "config": GRIFFIN_TINY,
                  "dtype": "bfloat16"})
    save_griffin_logits(args.out, model.to(torch.float32), state_dict)
    torch.save({"int64": torch.arange(6)}, os.path.join(args.out, "int64.pt"))
    torch.save({"float32": torch.ones(2)}, os.path.join(args.out, "legacy.pt"),
               _use_new_zipfile_serialization=False)
    print(f"wrote {args.out}/int64.pt and {args.out}/legacy.pt")


if __name__ == "__main__":
    main()
