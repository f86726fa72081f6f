# Two commands on a fresh clone: `make demo` and `make test`. Both create .venv when it is
# missing, install torch==2.13.0 first (the CPU wheel; an unpinned torch would pull CUDA),
# then the package with its extras. The stamp file makes a second run skip the install.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.moescope-installed
EXTRAS := all,test,dev,bench

.PHONY: demo test lint bench clean setup

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m moescope.demo --out demo-output

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) demo-output .pytest_cache
