# nnx: `make demo` runs the default job, `make test` the whole suite; both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
NNX := $(VENV)/bin/nnx
STAMP := $(VENV)/.installed

.PHONY: install test demo lint bench figures clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	@# PyTorch is only a test oracle and benchmark peer: take the local CPU wheel when the
	@# machine has one, and let the torch tests skip otherwise (never pull CUDA builds).
	-$(PY) -m pip install --quiet "torch==2.13.0+cpu" 2>/dev/null || echo "torch CPU wheel not available: torch oracle tests will skip"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

# The default sweep: hidden size x L2 strength x seeds on the spiral (resumes if interrupted).
demo: install
	$(NNX) sweep

# The cs231n notes' three claims, reproduced: figures and report in docs/cs231n/.
figures: install
	$(NNX) reproduce cs231n --out docs/cs231n

lint: install
	$(VENV)/bin/ruff check mlp experiments cli tests bench

bench: install
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) bench/bench_mlp.py
	$(PY) bench/bench_sweep.py
	$(PY) bench/bench_conv.py

clean:
	rm -rf $(VENV) runs .pytest_cache
