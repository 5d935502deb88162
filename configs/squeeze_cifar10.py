"""ResNet-18 (small stem) teacher on CIFAR-10 with the references' recipe.

  python -m prism_jax.main --config configs/squeeze_cifar10.py --workdir workdirs/cifar10 \
      --config.data.path=/path/to/cifar10   # directory with train.npz / test.npz

Expected: ~95% test accuracy after 200 epochs; about 1.5 h on one A100/TPU v4 chip.
On a 2-core CPU use the shrunken variant in benchmarks/squeeze.py instead.
"""

from configs import common


def get_config():
  config = common.base_config()
  config.stage = "squeeze"
  config.data = common.data_config(source="arrays", name="cifar10", path="data/cifar10")
  config.squeeze.teachers = ("resnet18",)
  return config
