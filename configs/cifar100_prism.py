"""PRISM on CIFAR-100 end to end: squeeze five small-stem teachers, recover, relabel, train, evaluate.

The parameter is the IPC, `ipc10` or `ipc50`:

  python -m prism_jax.main --config configs/cifar100_prism.py:ipc10 --workdir workdirs/c100_prism_ipc10

Data: TFDS `cifar100`, prepared once with `tfds build cifar100 --data_dir=tfds
--file_format=array_record` (nothing is downloaded at run time); local arrays work too
(`--config.data.source=arrays --config.data.path=data/cifar100`). On a Cloud GPU VM (see
launch/README.md):

  FLAGS="--name prism-c100 --zone us-central1-a --project MY_PROJECT"
  launch/gpu_vm.sh create $FLAGS --machine-type a3-highgpu-1g && launch/gpu_vm.sh setup $FLAGS
  launch/gpu_vm.sh run $FLAGS --config configs/cifar100_prism.py:ipc10 --workdir workdirs/c100_prism_ipc10 \
      --sync-from gs://MY_BUCKET/tfds:tfds

(`launch/tpu_vm.sh ... --accelerator-type v4-8` takes the same `run` flags.)

Everything but the data is configs/cifar10_prism.py: the five PRISM teachers squeezed with SRe2L's
CIFAR-100 recipe (SGD 0.1, wd 5e-4, batch 128, 200 epochs; ResNet-18 reaches 78.7% there), PRISM
selection with SRe2L's CIFAR augmentation (roll 0-4 px only), T = 1000 - 125 (i mod 8), lr 0.05,
one recovery batch of all 100 classes per IPC index, and the `prism` evaluation protocol.

Expected cost on one H100 (estimate, as in configs/cifar10_prism.py): squeeze 5-7 h; recover,
relabel, train and evaluate under 0.5 h at IPC 10 (1,000 images) and about 0.5 h at IPC 50 (5,000
images, 30,000 student steps).
"""

from __future__ import annotations

from configs import common, presets

ARGS = ("ipc10", "ipc50")


def get_config(arg: str | None = None):
  ipc = int(presets.choose(arg, ARGS, "configs/cifar100_prism.py")[len("ipc"):])
  config = presets.small_prism_config(ipc)
  config.data = common.data_config(source="tfds", name="cifar100")  # name: TFDS dataset and CIFAR mean/std
  config.data.tfds_data_dir = "tfds"  # relative to the repository root, as in the `tfds build` line above
  return presets.cifar_recovery(config)
