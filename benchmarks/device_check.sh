#!/usr/bin/env bash
# The accelerator check: recover throughput / memory / MFU at 224 px for K = 1..4 BN teachers,
# ResNet-18 training float32 vs bfloat16, and CIFAR-10 PRISM vs random real images in the time left
# (benchmarks/device_check.py). Runs in at most about 10 minutes on one GPU.
#
#   python benchmarks/prepare_device_check.py --cifar10 /path/to/cifar10   # once, where pip works
#   bash benchmarks/device_check.sh [--budget-s 480] [--parts recover,train,quality]
#
# Uses the machine's own python3 and JAX (no TensorFlow, TFDS or clu needed); the ml_collections
# wheel from .device_check/wheels is put on PYTHONPATH. Results: $OUT/device_check.json (OUT
# defaults to bench_out) and the printed tables.
set -euo pipefail
cd "$(dirname "$0")/.."
prepared=${PRISM_DEVICE_CHECK_DIR:-.device_check}
if [ ! -f "$prepared/cifar10/train.npz" ]; then
  echo "device_check: $prepared/cifar10/train.npz missing: run benchmarks/prepare_device_check.py first" >&2
  exit 1
fi
wheels=$(ls "$prepared"/wheels/*.whl 2>/dev/null | tr '\n' ':')
export PYTHONPATH="$PWD:${wheels}${PYTHONPATH:-}"
out_dir=${OUT:-bench_out}
mkdir -p "$out_dir"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
python3 benchmarks/device_check.py --data "$prepared/cifar10" --cache "$(mktemp -d)" \
  --out "$out_dir/device_check.json" "$@" 2>&1 | tee "$out_dir/device_check.log"
