"""PRISM on CIFAR-10 end to end: squeeze five small-stem teachers, recover, relabel, train, evaluate.

The parameter is the IPC, `ipc10` or `ipc50`:

  python -m prism_jax.main --config configs/cifar10_prism.py:ipc10 --workdir workdirs/c10_prism_ipc10

Data: local arrays in data/cifar10 (train.npz / test.npz, as ../shared/data/cifar10 on the project's
machines); for the TFDS copy use `--config.data.source=tfds` (after `tfds build cifar10
--file_format=array_record`). On a Cloud GPU VM (see launch/README.md):

  FLAGS="--name prism-c10 --zone us-central1-a --project MY_PROJECT"
  launch/gpu_vm.sh create $FLAGS --machine-type a3-highgpu-1g && launch/gpu_vm.sh setup $FLAGS
  launch/gpu_vm.sh run $FLAGS --config configs/cifar10_prism.py:ipc10 --workdir workdirs/c10_prism_ipc10 \
      --sync-from gs://MY_BUCKET/data/cifar10:data/cifar10

(`launch/tpu_vm.sh ... --accelerator-type v4-8` takes the same `run` flags.)

Squeeze: ResNet-18, MobileNetV2, EfficientNet-B0, ShuffleNetV2-0.5 and AlexNet (small stem), each
with the references' CIFAR recipe (SGD 0.1, momentum 0.9, wd 5e-4, batch 128, 200 epochs, pad-4 crop
+ flip). Recover: PRISM teacher selection (ResNet-18 logits, bernoulli BN extras per IPC index),
real-image init, lr 0.05, r_bn 0.01, with SRe2L's CIFAR augmentation (a circular roll of 0-4 px
only, no crop or flip; reference-methods.md 2.2) and T = 1000 - 125 (i mod 8), SRe2L's 1000
CIFAR iterations spread like PRISM's 4000 - 500 (i mod 8). Relabel + train: the `prism` protocol
(4-teacher soft labels, mse_gt, batch 50, 300 epochs, prism_cos2) with a small-stem ResNet-18.

Expected cost on one H100 (estimate): squeeze 5-7 h (the ResNet-18 takes about 1.5 h on one
A100 / TPU v4 chip, configs/squeeze_cifar10.py; the other four teachers have fewer FLOPs and are
assumed to take at most as long); recover, relabel, train and evaluate together under 0.5 h
(IPC 10: 100 images, 600 student steps; IPC 50: 500 images, 3,000 steps).
"""

from __future__ import annotations

from configs import common, presets

ARGS = ("ipc10", "ipc50")


def get_config(arg: str | None = None):
  ipc = int(presets.choose(arg, ARGS, "configs/cifar10_prism.py")[len("ipc"):])
  config = presets.small_prism_config(ipc)
  config.data = common.data_config(source="arrays", name="cifar10", path="data/cifar10")  # name: CIFAR mean/std
  return presets.cifar_recovery(config)
