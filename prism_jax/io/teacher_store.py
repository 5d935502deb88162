"""Teacher checkpoints: trained or imported model variables plus what they were made for.

Layout of a teacher directory:
  variables.msgpack   flax-serialized {'params', 'batch_stats'} (float32)
  teacher.json        model spec, class order, dataset fingerprint, test accuracy, checksum of
                      the variables file; written last, so its presence marks a finished teacher.
Squeezed teachers and torchvision imports share this format, so every later stage loads them the
same way.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from prism_jax.io import artifacts, fs

VARIABLES_FILE = "variables.msgpack"
META_FILE = "teacher.json"


def is_complete(teacher_dir: str) -> bool:
  return fs.exists(os.path.join(teacher_dir, META_FILE))


def save_teacher(teacher_dir: str, *, name: str, variables: Mapping[str, Any],
                 model_config: Mapping[str, Any], class_names: Sequence[str], dataset: Any,
                 test_accuracy: float | None, extra: Mapping[str, Any] | None = None) -> None:
  """Writes a teacher atomically (variables first, metadata last)."""
  host_vars = jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x), np.float32),
                                     dict(variables))
  data = flax.serialization.msgpack_serialize(host_vars)
  artifacts.write_bytes(os.path.join(teacher_dir, VARIABLES_FILE), data)
  meta = dict(name=name, model=dict(model_config), class_names=list(class_names),
              dataset=dataset, test_accuracy=test_accuracy,
              variables_sha256=artifacts.sha256_bytes(data), **dict(extra or {}))
  artifacts.write_json(os.path.join(teacher_dir, META_FILE), meta)


def damaged(teacher_dir: str, meta: Mapping[str, Any]) -> str | None:
  """Why a finished teacher's variables file cannot be trusted (missing, or not the recorded
  checksum), or None when it is intact."""
  path = os.path.join(teacher_dir, VARIABLES_FILE)
  if not fs.exists(path):
    return f"{path} is missing"
  if artifacts.sha256_file(path) != meta.get("variables_sha256"):
    return f"{path} fails its checksum"
  return None


def load_meta(teacher_dir: str) -> dict[str, Any]:
  path = os.path.join(teacher_dir, META_FILE)
  if not fs.exists(path):
    raise artifacts.ArtifactError(
        f"{path}: no finished teacher here (run the squeeze stage, or import torchvision weights "
        "with `python -m prism_jax.tools.import_torchvision`)")
  return artifacts.read_json(path)


def load_teacher(teacher_dir: str, *, expected_class_names: Sequence[str] | None = None,
                 dtype: Any = jnp.float32):
  """Returns (model, variables, meta); verifies checksum, class order and every tensor shape.
  `dtype` is the model's compute dtype (the variables stay float32)."""
  from prism_jax import models  # Local import keeps io/ free of model code at import time.

  meta = load_meta(teacher_dir)
  path = os.path.join(teacher_dir, VARIABLES_FILE)
  data = artifacts.read_verified_bytes(path, meta.get("variables_sha256"))
  variables = flax.serialization.msgpack_restore(data)
  if expected_class_names is not None and list(expected_class_names) != list(meta["class_names"]):
    raise artifacts.ArtifactError(
        f"{os.path.join(teacher_dir, META_FILE)}: teacher '{meta['name']}' was trained on classes "
        f"{_short(meta['class_names'])}, the data has {_short(expected_class_names)} "
        "(class count or order differs)")
  spec = meta["model"]
  model = models.create_model(spec["name"], num_classes=spec["num_classes"], stem=spec["stem"],
                              width=spec["width"], dtype=dtype)
  image_size = int(spec.get("image_size") or (224 if spec["stem"] == "imagenet" else 32))
  check_variables_match(model, variables, image_size=image_size, source=path)
  variables = jax.tree_util.tree_map(jnp.asarray, variables)
  return model, variables, meta


def check_variables_match(model, variables: Mapping[str, Any], *, image_size: int, source: str) -> None:
  """Compares a variables tree with what `model` expects; names the first mismatching key. The
  expected shapes are kept beside the compilation cache (io/exported.py: a rerun does not trace the
  model's initializer again)."""
  from prism_jax.io import exported
  from prism_jax.models import torchvision_import, tree_paths
  x_shape = (1, image_size, image_size, 3)
  try:
    expected = exported.leaf_shapes(lambda: torchvision_import.expected_variables(model, x_shape),
                                    name="model_variables", static={"model": model, "x_shape": x_shape})
    tree_paths.check_flat_shapes(expected, variables, source=source)
  except ValueError as e:
    raise artifacts.ArtifactError(str(e)) from None


def _short(names: Sequence[str]) -> str:
  names = list(names)
  return f"{len(names)} classes {names[:5]}{'...' if len(names) > 5 else ''}"


@dataclasses.dataclass(frozen=True)
class TeacherSet:
  """Teachers loaded for one use, in the order asked for."""
  names: tuple[str, ...]
  models: tuple
  variables: tuple
  metas: tuple

  @property
  def checksums(self) -> dict[str, str]:
    return {name: meta["variables_sha256"] for name, meta in zip(self.names, self.metas)}


def load_teacher_set(names: Sequence[str], teachers_root: str, *, class_names: Sequence[str],
                     needed_by: str, dtype: Any = jnp.float32) -> TeacherSet:
  """Loads teachers `names` from `teachers_root` (one sub-directory each), each verified (checksum,
  class order, shapes); a missing one is named with `needed_by` (the config field that asks for it)
  and how to make it. The one loader of recover, relabel, online training and evaluate."""
  models, variables, metas = [], [], []
  for name in names:
    path = os.path.join(teachers_root, name)
    if not is_complete(path):
      raise artifacts.ArtifactError(
          f"{path}: no teacher '{name}' (needed by {needed_by}); train it with the squeeze stage "
          f"(--config.stage=squeeze --config.squeeze.teachers=\"('{name}',)\") or import torchvision "
          "weights with `python -m prism_jax.tools.import_torchvision`")
    model, var, meta = load_teacher(path, expected_class_names=class_names, dtype=dtype)
    models.append(model); variables.append(var); metas.append(meta)
  return TeacherSet(tuple(names), tuple(models), tuple(variables), tuple(metas))
