"""rgref against golden logits exported from the official `recurrentgemma` package.

Each directory under tests/golden holds a Hugging Face layout checkpoint and a
`case.npz` of the calls made to the official model and the logits it returned
(see tools/export_golden.py, which records the reference version and seed).
Every case found there is checked, including ones added later.
"""

import glob
import json
import os

import numpy as np
import pytest

import rgref
from rgref import kernels
from tolerances import assert_close

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "golden")
CASES = sorted(os.path.basename(os.path.dirname(p))
               for p in glob.glob(os.path.join(GOLDEN_DIR, "*", "case.npz")))
REGENERATE = "regenerate the golden files with `make golden` (see tests/golden/README.md)"


def read_case(name):
    with np.load(os.path.join(GOLDEN_DIR, name, "case.npz")) as data:
        metadata = json.loads(str(data["metadata"]))
        calls = [(data[f"call{i}_tokens"], data[f"call{i}_segment_pos"], data[f"call{i}_logits"])
                 for i in range(int(data["num_calls"]))]
    return metadata, calls


def run_calls(model, calls):
    """Feed the calls in order, continuing the cache; return the logits of each."""
    cache = None
    outputs = []
    for tokens, segment_pos, _ in calls:
        logits, cache = model.forward(tokens, segment_pos=segment_pos, cache=cache)
        outputs.append(logits)
    return outputs


def test_golden_cases_present():
    assert len(CASES) >= 9, f"expected the committed golden cases in {GOLDEN_DIR}; {REGENERATE}"


@pytest.mark.parametrize("case", CASES)
def test_golden_metadata(case):
    metadata, calls = read_case(case)
    assert metadata["reference"]["package"] == "recurrentgemma"
    assert "version" in metadata["reference"]
    assert "seed" in metadata
    assert calls, f"{case}: case.npz has no calls"


needs_kernels = pytest.mark.skipif(not kernels.available(),
                                   reason=f"C kernels not built: {kernels.unavailable_reason()}")
BACKENDS = [pytest.param("numpy", "float32", id="numpy-float32"),
            pytest.param("numpy", "float64", id="numpy-float64"),
            pytest.param("c", "float32", id="c-float32", marks=needs_kernels)]


@pytest.mark.parametrize("backend, dtype", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_golden_logits(case, backend, dtype):
    _, calls = read_case(case)
    model = rgref.load(os.path.join(GOLDEN_DIR, case), dtype=np.dtype(dtype))
    model.backend = backend
    for i, (logits, (_, segment_pos, expected)) in enumerate(zip(run_calls(model, calls), calls)):
        # Logits at left padding carry no meaning in either implementation.
        assert_close(logits, expected, f"golden_{dtype}",
                     f"{case} call {i} ({backend}, {dtype}); {REGENERATE}",
                     mask=segment_pos >= 0)


@pytest.mark.parametrize("case", [c for c in CASES
                                  if os.path.exists(os.path.join(GOLDEN_DIR, c,
                                                                 "official.safetensors"))])
def test_golden_official_names(case):
    """The same weights saved under the official `blocks.N...` names load identically."""
    _, calls = read_case(case)
    model = rgref.load(os.path.join(GOLDEN_DIR, case, "official.safetensors"))
    for i, (logits, (_, segment_pos, expected)) in enumerate(zip(run_calls(model, calls), calls)):
        assert_close(logits, expected, "golden_float32", f"{case} call {i} (official names)",
                     mask=segment_pos >= 0)


@pytest.mark.parametrize("backend", ["numpy", pytest.param("c", marks=needs_kernels)])
@pytest.mark.parametrize("chunk", [1, 3, 8, 1000])
@pytest.mark.parametrize("case", [c for c in CASES if len(read_case(c)[1]) > 1])
def test_golden_rechunked(case, chunk, backend):
    """Decode cases replayed in chunks of any size give the official per-token logits."""
    _, calls = read_case(case)
    tokens = np.concatenate([c[0] for c in calls], axis=1)
    segment_pos = np.concatenate([c[1] for c in calls], axis=1)
    expected = np.concatenate([c[2] for c in calls], axis=1)
    model = rgref.load(os.path.join(GOLDEN_DIR, case))
    model.backend = backend
    cache = None
    outputs = []
    for start in range(0, tokens.shape[1], chunk):
        logits, cache = model.forward(tokens[:, start:start + chunk],
                                      segment_pos=segment_pos[:, start:start + chunk],
                                      cache=cache)
        outputs.append(logits)
    assert_close(np.concatenate(outputs, axis=1), expected, "golden_float32",
                 f"{case} replayed in chunks of {chunk}", mask=segment_pos >= 0)
