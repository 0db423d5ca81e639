#!/usr/bin/env bash
# Downloads the wheels Keras 3 needs on a GPU machine that has JAX (CUDA) but
# no Keras and no internet access (e.g. a cluster node or a container image
# with jax[cuda] preinstalled). Run it on a machine with internet, in the
# project root:
#   bash scripts/fetch-gpu-wheels.sh            # PYTHON_VERSION=3.12 by default
# copy the project (with its .whl/ folder) to the GPU machine, then there:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD KERAS_BACKEND=jax
#   python bench/gpu_check.py
# The GPU machine must already have jax, numpy, h5py, ml-dtypes, absl-py, rich
# and packaging (a jax[cuda] install has them). GPU runs use the JAX backend
# (TensorFlow's wheel is too large to ship this way).
set -euo pipefail
if [ -d .git ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
fi
python3 -m pip download -q --no-deps --only-binary=:all: \
  --python-version "${PYTHON_VERSION:-3.12}" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "keras==${KERAS_VERSION:-3.15.1}" namex==0.1.0 optree==0.20.0
ls -la .whl
