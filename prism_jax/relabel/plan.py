"""The relabel plan (SPEC 5): what every (epoch, batch) of student training sees, from the config alone.

Stored soft labels (relabel stage), online soft labels and hard-label training (train stage) all
draw the same plan: batch `b` of epoch `e` takes `views.batch_indices(...)` of the set and the view
parameters drawn from `views.batch_key(seed, e, b)`, so a student sees the same batches whichever
mode made its labels. The fingerprint here is what the stored labels are checked against.
"""

from __future__ import annotations

import functools

import jax

from prism_jax import errors
from prism_jax.relabel import aggregate, views
from prism_jax.train import losses, precision, protocols

MODES = ("stored", "online")


def view_spec(config, dataset) -> views.ViewSpec:
  rl = config.relabel
  spec = views.ViewSpec(image_size=dataset.image_size, rrc_scale=tuple(float(s) for s in rl.rrc_scale),
                        flip=bool(rl.flip), cutmix=bool(rl.cutmix), patch_shuffle_grid=int(rl.patch_shuffle_grid))
  spec.validate()
  return spec


def check_config(config) -> None:
  rl, tr = config.relabel, config.train
  if rl.mode not in MODES:
    raise errors.ConfigError(f"relabel.mode={rl.mode!r}: expected one of {MODES}")
  if rl.aggregation not in aggregate.AGGREGATIONS:
    raise errors.ConfigError(f"relabel.aggregation={rl.aggregation!r}: expected one of {aggregate.AGGREGATIONS}")
  if tr.loss not in losses.LOSSES:
    raise errors.ConfigError(f"train.loss={tr.loss!r}: expected one of {losses.LOSSES}")
  if not rl.teachers and not uses_hard_labels_only(config):
    raise errors.ConfigError("relabel.teachers is empty: expected at least one teacher name")
  if rl.aggregation == "single" and len(rl.teachers) != 1:
    raise errors.ConfigError(f"relabel.aggregation='single' uses one teacher, got relabel.teachers={tuple(rl.teachers)}")
  if tr.epochs < 1 or tr.batch_size < 1:
    raise errors.ConfigError(f"train.epochs={tr.epochs} / train.batch_size={tr.batch_size}: expected >= 1")
  protocols.check(config)
  if not config.image_sets:
    raise errors.ConfigError("image_sets is empty: expected e.g. ('recover',) or ('recover', 'random_real')")


def uses_hard_labels_only(config) -> bool:
  """True when the student loss reads no teacher logits (`train.loss='ce'`): nothing to relabel."""
  return config.train.loss in losses.HARD_LABEL_LOSSES


def plan_shape(image_set, batch_size: int) -> int:
  """Batches per epoch (the remainder of the shuffled order is dropped, like the teacher pipeline)."""
  batches = image_set.num_images // batch_size
  if batches < 1:
    raise errors.ConfigError(f"train.batch_size={batch_size} is larger than the {image_set.num_images} images of "
                     f"the '{image_set.name}' set; lower it to at most {image_set.num_images}")
  return batches


def view_settings(config) -> dict:
  """The relabel fields that decide the student's views."""
  rl = config.relabel
  return {"rrc_scale": list(rl.rrc_scale), "flip": bool(rl.flip), "cutmix": bool(rl.cutmix),
          "patch_shuffle_grid": int(rl.patch_shuffle_grid)}


def fingerprint(config, dataset, image_set, teacher_sums: dict) -> dict:
  rl, tr = config.relabel, config.train
  return {"image_set": image_set.fingerprint(), "class_names": list(dataset.class_names),
          "teachers": teacher_sums, "aggregation": rl.aggregation,
          "views": {**view_settings(config), "image_size": dataset.image_size},
          "seed": config.seed, "batch_size": tr.batch_size, "epochs": tr.epochs,
          "normalization": {"mean": list(dataset.mean), "std": list(dataset.std)},
          **precision.resolve(config, "relabel").fingerprint()}


@functools.lru_cache(maxsize=None)
def params_fn(batch_size: int, spec: views.ViewSpec):
  return jax.jit(functools.partial(views.sample_view_params, batch_size=batch_size, spec=spec))


def draw_batch(image_set_size: int, batch_size: int, spec, seed: int, epoch: int, batch: int):
  """(indices, ViewParams) of one batch: the plan every mode shares."""
  indices = views.batch_indices(image_set_size, batch_size, seed, epoch, batch)
  params = params_fn(batch_size, spec)(views.batch_key(seed, epoch, batch))
  return indices, params
