# The two commands a newcomer runs on a fresh machine:
#   make demo   # set up, train MNIST with and without BN, stats, folded ONNX export
#   make test   # set up, run every test on the TensorFlow and the JAX backend
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.keras-bn-installed

.PHONY: setup demo test lint bench zoo zoo-table

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[tf-cpu,jax,onnx,examples,dev]"
	# tf_keras (a benchmark peer) without pulling the full tensorflow package.
	$(PY) -m pip install -q --no-deps "tf-keras>=2.20"
	touch $(STAMP)

demo: $(STAMP)
	KERAS_BACKEND=tensorflow $(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m ruff format --check . && $(VENV)/bin/codespell
	KERAS_BACKEND=tensorflow $(PY) -m pytest -q
	KERAS_BACKEND=jax $(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m ruff format --check . && $(VENV)/bin/codespell

# The conformance zoo: keras.applications and keras_hub models (slow: about an
# hour on 2 cores). `make zoo BACKEND=jax` runs it on another backend.
BACKEND ?= tensorflow
zoo: $(STAMP)
	KERAS_BACKEND=$(BACKEND) $(PY) -m pytest -q -m zoo tests/zoo

# Rewrites docs/zoo.md (runs the zoo once more, with timings).
zoo-table: $(STAMP)
	KERAS_BACKEND=tensorflow $(PY) -m tests.zoo.make_table -o docs/zoo.md
