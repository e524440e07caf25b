# rgref: a menu of the common jobs. Run `make help` to list them.

PYTHON ?= python3
# The official implementation lives in its own virtual environment because it
# needs PyTorch, JAX and numpy < 2.4; the package and its tests never use it.
REF_VENV ?= .venv-ref
REF_PYTHON = $(REF_VENV)/bin/python

.PHONY: help setup demo test golden tools-env tiny-model

help:  ## List the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

setup:  ## Install rgref in editable mode with its test tools.
	$(PYTHON) -m pip install -e '.[test]'

demo: setup  ## Install, then generate text with the bundled small model.
	$(PYTHON) -m rgref.generate "The secret of a happy life is" --max-new-tokens 60

test:  ## Run the test suite (the same command CI runs).
	$(PYTHON) -m pytest -q tests

tools-env:  ## Create $(REF_VENV) with the official recurrentgemma (tools only).
	$(PYTHON) -m venv $(REF_VENV)
	$(REF_PYTHON) -m pip install torch==2.13.0
	$(REF_PYTHON) -m pip install recurrentgemma==1.0.1 jax flax sentencepiece safetensors

golden:  ## Re-export tests/golden from the official implementation (needs tools-env).
	$(REF_PYTHON) tools/export_golden.py --out tests/golden

tiny-model:  ## Retrain rgref/data/tiny (needs tools-env and `apt-get install -y fortunes`; 30-40 min).
	$(REF_PYTHON) tools/train_tiny.py

# The C kernels. Both targets honour CC (the C compiler) and RGREF_NO_OPENMP=1 (build
# without OpenMP), e.g. `make build CC=clang`.
.PHONY: build clean-build

build:  ## Compile the C kernels in place after editing csrc/ (pip install -e . does it too).
	@$(PYTHON) rgref/_build_kernels.py --probe
	$(PYTHON) rgref/_build_kernels.py

clean-build:  ## Delete the compiled kernels and build/; rgref then uses its NumPy code.
	rm -rf build
	rm -f rgref/_kernels.*.so rgref/_kernels.*.pyd

# Benchmarks at RecurrentGemma-2B sizes on synthetic weights, written once to bench-cache/
# (about 22 GB). The official recurrentgemma runs in REF_VENV; HF_PATH adds a directory
# holding transformers (pip install --target) for the side-by-side runs.
.PHONY: bench

bench:  ## Measure speed and memory at 2B size (about an hour); rewrites docs/BENCHMARKS.md.
	$(PYTHON) tools/bench.py --ref-python $(REF_PYTHON) $(if $(HF_PATH),--transformers-path $(HF_PATH)) --write docs/BENCHMARKS.md
