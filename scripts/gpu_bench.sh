#!/usr/bin/env bash
# The GPU benchmark rows in one run, on a machine with a GPU (Keras on JAX).
#
# Here, once:  bash scripts/fetch-gpu-wheels.sh   (Keras wheels into .whl/)
# On the GPU machine, with .whl/ copied over (about 6-8 minutes on an H100/H200):
#   bash scripts/gpu_bench.sh
# It writes to $OUT (default ./gpu_out):
#   check.txt   bench/gpu_check.py: correctness against float64 on the device
#   layer.md    bench/bench_layer.py --shapes gpu --floor: keras_bn vs Keras 3
#               BN and the 8-pass floor
#   resnet_float32.md, resnet_mixed_bfloat16.md   bench/bench_resnet.py: a
#               ResNet-50 training step with Keras BN, keras_bn and no BN
# SMALL=1 runs the same steps at toy sizes (a check of the script on a CPU).
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if ! python3 -c "import keras" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} KERAS_BACKEND=jax
PY=${PY:-python3}
if [ -n "${SMALL:-}" ]; then
  LAYER_ARGS=(--shapes small --floor --dtypes float32 --inner 2 --repeats 2)
  RESNET_ARGS=(--batch 2 --size 32 --repeats 2 --inner 1)
else
  LAYER_ARGS=(--shapes gpu --floor --dtypes float32,bfloat16 --inner 20 --repeats 10)
  RESNET_ARGS=(--batch 128 --size 224 --repeats 10 --inner 10)
fi
status=0
run() {  # name, command...: output to $OUT/name, a failure noted, the rest runs
  local name=$1
  shift
  echo "== $name: $*"
  "$@" >"$OUT/$name" 2>"$OUT/$name.err" || { status=1; echo "FAILED: $name"; }
  tail -n 12 "$OUT/$name"
}
run check.txt "$PY" bench/gpu_check.py
run layer.md "$PY" bench/bench_layer.py "${LAYER_ARGS[@]}"
for dtype in float32 mixed_bfloat16; do
  run "resnet_$dtype.md" "$PY" bench/bench_resnet.py --dtype "$dtype" \
    "${RESNET_ARGS[@]}"
done
exit $status
