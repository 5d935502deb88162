"""Tiny data and randomly initialized teachers for recover tests (no training needed)."""

import os

import jax
import numpy as np

from prism_jax import models
from prism_jax.io import teacher_store

IMAGE_SIZE = 16
CLASS_NAMES = ("ant", "bee", "cat", "dog")


def write_tiny_arrays(directory: str, per_class: int = 3, num_classes: int = 4, size: int = IMAGE_SIZE) -> str:
  """A tiny `arrays` data set: smooth random images, `per_class` train and 2 test images per class."""
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(0)
  for split, n in (("train", per_class), ("test", 2)):
    labels = np.repeat(np.arange(num_classes), n).astype(np.int64)
    base = rng.uniform(0, 255, (len(labels), size // 4, size // 4, 3))
    images = np.repeat(np.repeat(base, 4, axis=1), 4, axis=2).astype(np.uint8)
    np.savez(os.path.join(directory, f"{split}.npz"), images=images, labels=labels,
             class_names=np.asarray(CLASS_NAMES[:num_classes]))
  return directory


def write_random_teacher(teachers_dir: str, name: str, *, class_names=CLASS_NAMES, width: float = 0.125,
                         seed: int = 0, size: int = IMAGE_SIZE) -> None:
  """A randomly initialized small-stem teacher with non-trivial BN running statistics."""
  model = models.create_model(name, num_classes=len(class_names), stem="small", width=width)
  variables = dict(models.random_variables(model, (2, size, size, 3), seed=seed))
  rng = np.random.default_rng(seed)
  if "batch_stats" in variables:
    variables["batch_stats"] = jax.tree_util.tree_map(
        lambda v: rng.uniform(0.05, 0.5, v.shape).astype(np.float32) if v.ndim else v,
        variables["batch_stats"])
  teacher_store.save_teacher(
      os.path.join(teachers_dir, name), name=name, variables=variables,
      model_config=dict(name=name, num_classes=len(class_names), stem="small", width=width, image_size=size),
      class_names=class_names, dataset={"name": "tiny"}, test_accuracy=None)
