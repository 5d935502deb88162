"""Tiny data and randomly initialized teachers for recover tests (no training needed)."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prism_jax import models
from prism_jax.io import teacher_store
from prism_jax.models import layers

IMAGE_SIZE = 16
CLASS_NAMES = ("ant", "bee", "cat", "dog")


class TinyTeacher(nn.Module):
  """conv-BN-relu blocks + pooled dense with the zoo's call signature; compiles in about a second.

  `depth` = 0 gives a BN-less model (like alexnet).
  """
  num_classes: int
  stem: str = "small"
  width: float = 1.0
  depth: int = 2
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    for i in range(max(self.depth, 1)):
      x = layers.conv(4 * (i + 1), 3, stride=1 + (i > 0), name=f"conv{i}")(x)
      if self.depth:
        x = layers.BatchNorm(name=f"bn{i}")(x, train)
      x = nn.relu(x)
    features = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, name="fc")(features)
    return (logits, features) if return_features else logits


# Tiny stand-ins for the zoo teachers in in-process recover tests (CLI tests use real models).
TINY_TEACHERS = {"tiny_a": 2, "tiny_b": 3, "tiny_nobn": 0}
for _name, _depth in TINY_TEACHERS.items():
  if _name not in models.available_models():
    models.register_model(_name, lambda depth=_depth, **kw: TinyTeacher(depth=depth, **kw))


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


def write_random_teachers(teachers_dir: str, names=("tiny_a", "tiny_b")) -> str:
  """`write_random_teacher` for each name, seeded by its position; returns `teachers_dir`."""
  for seed, name in enumerate(names):
    write_random_teacher(teachers_dir, name, seed=seed)
  return teachers_dir


def write_relabel_assets(root: str) -> dict:
  """Tiny arrays with 6 images per class and the teachers tiny_a, tiny_b: relabel/train tests."""
  return {"data": write_tiny_arrays(os.path.join(root, "data"), per_class=6),
          "teachers": write_random_teachers(os.path.join(root, "teachers"))}


def run_recover(config, workdir: str, mesh) -> dict:
  """The distill stage's result for the set 'recover' (the method config.recover describes)."""
  from prism_jax.stages import distill
  return distill.run(config, workdir, mesh)["recover"]


def wave_images(workdir: str) -> dict:
  """Final float images of every finished recovery unit of the work directory's 'recover' set."""
  from prism_jax.recover import runner
  return runner.load_wave_images(os.path.join(workdir, "recover"))


def teacher_set(names, teachers_dir: str, dataset):
  """(models, variables, checksums) of teachers `names` (io/teacher_store.load_teacher_set)."""
  from prism_jax.io import teacher_store
  teachers = teacher_store.load_teacher_set(tuple(names), teachers_dir, class_names=dataset.class_names,
                                            needed_by="this test")
  return teachers.models, teachers.variables, teachers.checksums


def distill(config, workdir: str, mesh=None) -> dict:
  """The distill stage (makes every set of config.image_sets, e.g. random_real) on one device."""
  from prism_jax.parallel import mesh as mesh_lib
  from prism_jax.stages import distill as distill_stage
  return distill_stage.run(config, workdir, mesh or mesh_lib.make_mesh(1))


def write_random_dit(workdir: str, class_names=CLASS_NAMES, size: int = IMAGE_SIZE, seed: int = 0) -> None:
  """A DiT-T/2 with every parameter random (adaLN-Zero's zeros too, so labels and blocks matter),
  stored where the work directory's diffusion stage would put a trained one."""
  from prism_jax.diffusion import dit as dit_lib
  from prism_jax.io import diffusion_store, layout
  spec = dit_lib.dit_spec("T/2", input_size=size, in_channels=3, num_classes=len(class_names))
  variables = dit_lib.init_dit(dit_lib.create_dit(spec), jax.random.PRNGKey(seed))
  leaves, tree = jax.tree_util.tree_flatten(variables)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  leaves = [np.asarray(v) + 0.05 * np.asarray(jax.random.normal(k, v.shape)) for v, k in zip(leaves, keys)]
  diffusion_store.save_model(layout.diffusion_model_dir(workdir), kind="dit",
                             variables=jax.tree_util.tree_unflatten(tree, leaves), spec=spec,
                             class_names=tuple(class_names), extra={"space": "pixel"})
