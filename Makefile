# The two commands a newcomer runs on a fresh machine:
#   make demo   # set up, train MNIST with and without BN, stats, folded ONNX export
#   make test   # set up, run every test on TensorFlow, JAX and PyTorch
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.keras-bn-installed

.PHONY: setup demo test test-tensorflow test-jax test-torch lint bench zoo zoo-table \
	wheel-smoke fuzz

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the version whose CPU wheel the setup expects (other
	# versions may pull a multi-GB CUDA build from the registry).
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[tf-cpu,jax,torch,export,export-jax,export-torch,tensorboard,examples,dev]"
	# tf_keras (a benchmark peer) without pulling the full tensorflow package.
	$(PY) -m pip install -q --no-deps "tf-keras>=2.20"
	# keras_hub models in the tests, without tensorflow-text (which would pull
	# the full tensorflow package next to tensorflow-cpu): its other imports.
	$(PY) -m pip install -q --no-deps "keras-hub==0.32.0"
	$(PY) -m pip install -q absl-py regex rich packaging tokenizers sentencepiece kagglehub
	touch $(STAMP)

demo: $(STAMP)
	KERAS_BACKEND=tensorflow $(PY) examples/demo.py

# Lint, then the suite once per backend (one process each: the backend is
# chosen at import), the three side by side, as much of a run is
# single-threaded (compilers, Python). Each backend's output is printed whole
# when it finishes; `make test-jax` (or -tensorflow, -torch) runs one.
test: $(STAMP)
	$(MAKE) --no-print-directory lint
	@echo "Running the tests on tensorflow, jax and torch side by side;" \
		"each backend's output follows when it finishes."
	$(MAKE) --no-print-directory -j3 --output-sync=target \
		test-tensorflow test-jax test-torch

test-tensorflow test-jax test-torch: test-%: $(STAMP)
	KERAS_BACKEND=$* $(PY) -m pytest -q -o cache_dir=.pytest_cache/$*

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

# Builds the sdist and the wheel (from the sdist), installs the wheel with
# [tf-cpu,export] in a fresh virtual environment outside the repository and runs
# scripts/smoke_wheel.py there, the README's quickstart included. pip's cache
# makes a second run fast.
wheel-smoke: $(STAMP)
	set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PY) -m build -q --outdir "$$tmp/dist" . >/dev/null; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/python" -m pip install -q --upgrade pip; \
	"$$tmp/venv/bin/python" -m pip install -q "$$(ls "$$tmp"/dist/*.whl)[tf-cpu,export]"; \
	cp scripts/smoke_wheel.py README.md "$$tmp/"; \
	cd "$$tmp" && TF_CPP_MIN_LOG_LEVEL=3 "$$tmp/venv/bin/python" smoke_wheel.py

# Differential fuzzing of fold_onnx with more examples than `make test` runs
# (random seed; FUZZ_EXAMPLES=N to change the count).
FUZZ_EXAMPLES ?= 3000
fuzz: $(STAMP)
	KERAS_BACKEND=tensorflow KERAS_BN_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) \
		$(PY) -m pytest -q -p no:cacheprovider tests/test_onnx_fold_fuzz.py --hypothesis-show-statistics
