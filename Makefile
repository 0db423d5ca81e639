# The two commands a newcomer runs on a fresh machine:
#   make demo   # set up, train MNIST with and without BN, stats, folded ONNX export
#   make test   # set up, run every test on the TensorFlow, JAX and torch backends
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.keras-bn-installed

.PHONY: setup demo test lint bench zoo zoo-table

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the version whose CPU wheel the setup expects (other
	# versions may pull a multi-GB CUDA build from the registry).
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[tf-cpu,jax,torch,onnx,examples,dev]"
	# tf_keras (a benchmark peer) without pulling the full tensorflow package.
	$(PY) -m pip install -q --no-deps "tf-keras>=2.20"
	touch $(STAMP)

demo: $(STAMP)
	KERAS_BACKEND=tensorflow $(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m ruff format --check . && $(VENV)/bin/codespell
	KERAS_BACKEND=tensorflow $(PY) -m pytest -q
	KERAS_BACKEND=jax $(PY) -m pytest -q
	KERAS_BACKEND=torch $(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m ruff format --check . && $(VENV)/bin/codespell

# The keras.applications conformance zoo (slow: about an hour on 2 cores).
zoo: $(STAMP)
	KERAS_BACKEND=tensorflow $(PY) -m pytest -q -m zoo tests/zoo

# Rewrites docs/zoo.md (runs the zoo once more, with timings).
zoo-table: $(STAMP)
	KERAS_BACKEND=tensorflow $(PY) -m tests.zoo.make_table -o docs/zoo.md
