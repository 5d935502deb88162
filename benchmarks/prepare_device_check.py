"""Prepares what benchmarks/device_check.sh needs on a machine without a package registry.

  python benchmarks/prepare_device_check.py --cifar10 /path/to/cifar10 [--out .device_check]

Writes into --out (git-ignored; carry it to the device machine with the working tree):
  cifar10/train.npz, cifar10/test.npz   a class-balanced CIFAR-10 subset: the first 1,000 training
                                        and the first 200 test images of each class in storage order
                                        (10,000 + 2,000 images, about 36 MB uncompressed)
  wheels/ml_collections-*.whl           the pure-Python config library the configs use (the device
                                        machines have JAX, flax, optax and orbax, but not it)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import numpy as np


def balanced_subset(path: str, per_class: int):
  with np.load(path, allow_pickle=False) as data:
    images, labels, class_names = data["images"], data["labels"], data["class_names"]
  keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(len(class_names))])
  keep.sort()
  return images[keep], labels[keep], class_names


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--cifar10", required=True, help="directory with CIFAR-10 train.npz / test.npz")
  parser.add_argument("--out", default=".device_check")
  parser.add_argument("--train-per-class", type=int, default=1000)
  parser.add_argument("--test-per-class", type=int, default=200)
  args = parser.parse_args(argv)
  data_dir = os.path.join(args.out, "cifar10")
  os.makedirs(data_dir, exist_ok=True)
  for split, per_class in (("train", args.train_per_class), ("test", args.test_per_class)):
    images, labels, class_names = balanced_subset(os.path.join(args.cifar10, f"{split}.npz"), per_class)
    np.savez(os.path.join(data_dir, f"{split}.npz"), images=images, labels=labels, class_names=class_names)
    print(f"{split}: {len(labels)} images -> {data_dir}/{split}.npz")
  wheels = os.path.join(args.out, "wheels")
  os.makedirs(wheels, exist_ok=True)
  subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", wheels, "ml-collections==1.1.0"],
                 check=True)
  print(f"wrote {args.out}: carry it with the working tree and run `bash benchmarks/device_check.sh`")


if __name__ == "__main__":
  main()
