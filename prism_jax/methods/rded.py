"""RDED (Sun et al. 2024) as a method: a classifier (the observer, any zoo teacher) scores random crops
of real images, and the most confidently classified ones are stitched into the distilled images
(SPEC 12; reference-methods.md 5.1).

Per class (one unit, kept in units/class_NNNNN.npz so a killed run resumes per class):
  1. `mipc` training images of the class, drawn by a seeded generator;
  2. `num_crop` random-resized crops of each (`scale`, `ratio`; boxes drawn per (seed, class, image)),
     resized to S // factor, normalized, zero-padded (in normalized space) to S x S, centred;
  3. score = the observer's cross-entropy of the true class (eval mode); each image keeps its
     lowest-CE crop, and the class keeps its IPC * factor² lowest-CE crops;
  4. image t stitches crops k * IPC + t of that ranking into a factor x factor grid (factor 1: the
     best crops themselves).
The manifest records each cell's training index, crop box (top, left, height, width in source
pixels), score and rank. Scoring runs in batches sharded over the mesh; it is deterministic per seed
and the same on any device count.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from prism_jax import errors
from prism_jax.io import monitoring, teacher_store
from prism_jax.methods import base, units
from prism_jax.parallel import mesh as mesh_lib, multihost
from prism_jax.patches import crops as crops_lib
from prism_jax.train import precision

NAME = "rded"
AUTO_FACTOR_MIN_SIZE = 112  # factor -1: 2 from this image size up (RDED's ImageNet scripts), else 1 (CIFAR, Tiny)


def auto_factor(factor: int, image_size: int) -> int:
  if factor != -1:
    return int(factor)
  return 2 if image_size >= AUTO_FACTOR_MIN_SIZE else 1


def check_patch_settings(settings, field: str, factor_auto: str = "by image size") -> None:
  """The crop settings RDED and DPS share."""
  for name in ("mipc", "num_crop"):
    if not isinstance(settings[name], int) or settings[name] < 1:
      raise errors.ConfigError(f"{field}.{name}={settings[name]!r}: expected an integer >= 1")
  if settings.factor != -1 and (not isinstance(settings.factor, int) or settings.factor < 1):
    raise errors.ConfigError(f"{field}.factor={settings.factor!r}: expected -1 ({factor_auto}) or an integer >= 1")
  scale, ratio = tuple(settings.scale), tuple(settings.ratio)
  if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
    raise errors.ConfigError(f"{field}.scale={scale!r}: expected (low, high) with 0 < low <= high <= 1")
  if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
    raise errors.ConfigError(f"{field}.ratio={ratio!r}: expected (low, high) with 0 < low <= high")
  if not isinstance(settings.ipc, int) or settings.ipc < 1:
    raise errors.ConfigError(f"{field}.ipc={settings.ipc!r}: expected an integer >= 1")
  if settings.seed < -1:
    raise errors.ConfigError(f"{field}.seed={settings.seed!r}: expected -1 (the run's seed) or >= 0")


def check_factor(factor: int, image_size: int, field: str) -> None:
  if image_size % factor:
    raise errors.ConfigError(f"{field}.factor={factor}: does not divide the image size {image_size} px "
                             f"(the stitched cells would differ in size); use a divisor of {image_size}")


def check_candidates(r: dict, dataset, field: str) -> None:
  """The factor divides the image size and every class offers IPC x factor² candidate images (each
  image gives one kept crop)."""
  check_factor(r["factor"], dataset.image_size, field)
  needed = r["ipc"] * r["factor"] ** 2
  per_class = [min(len(ix), r["mipc"]) for ix in dataset.class_indices("train")]
  smallest = int(np.argmin(per_class))
  if per_class[smallest] < needed:
    raise errors.ConfigError(
        f"{field}.ipc={r['ipc']} with factor {r['factor']} needs {needed} crops per class (one kept per candidate "
        f"image), but class {smallest} ('{dataset.class_names[smallest]}') offers {per_class[smallest]} "
        f"candidate images ({field}.mipc={r['mipc']}); lower ipc or factor")


def write_patch_set(ctx, r: dict, results: list, method: str, extra: dict, cell_fields: tuple) -> None:
  """Writes a patch method's set from its per-class units (images (IPC, S, S, 3) and per-cell arrays
  (IPC, cells[, ...])): images in (IPC index, class) order, one manifest record per image with the
  `extra` fields and, per cell, its training index, crop box and `cell_fields`."""
  dataset, ipc, cells = ctx.dataset, r["ipc"], r["factor"] ** 2
  images = by_ipc_then_class([u["images"] for u in results])
  labels = np.tile(np.arange(dataset.num_classes), ipc).astype(np.int32)
  ipc_index = np.repeat(np.arange(ipc), dataset.num_classes).astype(np.int32)
  manifest = []
  for t, c in zip(ipc_index, labels):
    u = results[c]
    records = []
    for k in range(cells):
      record = {"train_index": int(u["train_index"][t, k]), "box": [int(v) for v in u["box"][t, k]]}
      record.update({f: (float if f == "score" else int)(u[f][t, k]) for f in cell_fields})
      records.append(record)
    manifest.append({"class": int(c), "class_name": dataset.class_names[int(c)], "ipc_index": int(t),
                     "method": method, "seed": r["seed"], "factor": r["factor"], **extra, "cells": records})
  base.write_set(ctx, images, labels, ipc_index, manifest)


def candidate_indices(dataset, seed: int, purpose: str, klass: int, mipc: int) -> np.ndarray:
  """Up to `mipc` training indices of class `klass`, a seeded draw without replacement."""
  pool = dataset.class_indices("train")[klass]
  return np.asarray(units.unit_rng(seed, purpose, klass).permutation(pool)[:mipc], np.int64)


def crop_boxes(seed: int, purpose: str, klass: int, train_index: int, num_crop: int, size: int,
               scale, ratio) -> np.ndarray:
  rng = units.unit_rng(seed, purpose, klass, train_index)
  return np.array([crops_lib.random_resized_crop_box(rng, size, size, scale, ratio) for _ in range(num_crop)])


def class_candidates(dataset, r: dict, method: str, klass: int, crop_size: int):
  """(training indices, crop boxes (n, num_crop, 4), crops (n * num_crop, s, s, 3) uint8) of a class:
  the seeded candidate images and their random-resized crops at `crop_size` px."""
  size = dataset.image_size
  chosen = candidate_indices(dataset, r["seed"], f"{method}/images", klass, r["mipc"])
  images = dataset.read("train", chosen)
  boxes = np.stack([crop_boxes(r["seed"], f"{method}/crops", klass, t, r["num_crop"], size, r["scale"], r["ratio"])
                    for t in chosen])
  patches = np.stack([crops_lib.crop_resize(images[i], box, crop_size)
                      for i in range(len(chosen)) for box in boxes[i]])
  return chosen, boxes, patches


def run_per_class(ctx, r: dict, method: str, make_class, write) -> dict:
  """A patch method's units, one class each (kept in units/class_NNNNN.npz): `make_class(klass)` makes a
  class's arrays; `write(results)` writes the set on process 0. Returns the marker's fields."""
  dataset = ctx.dataset
  store = units.Units(ctx.unit_dir, ctx.tag)
  progress = monitoring.Progress(ctx.tag, dataset.num_classes, unit="class", items_per_step=r["mipc"] * r["num_crop"],
                                 item_unit="crop", interval_s=ctx.config.progress_interval_s)
  start, results = time.perf_counter(), []
  for klass in range(dataset.num_classes):
    results.append(store.get_or_make(f"class_{klass:05d}", f"{method} class {klass}",
                                     lambda klass=klass: make_class(klass)))
    progress.update(klass + 1)
  meta = {"num_images": r["ipc"] * dataset.num_classes, "class_names": list(dataset.class_names),
          "units_reused": store.reused}
  if multihost.is_main_process():
    write(results)
    meta["wall_seconds_last_run"] = time.perf_counter() - start
  return meta


def by_ipc_then_class(per_class: list[np.ndarray]) -> np.ndarray:
  """Row order of a set (IPC index major, class minor) from per-class (IPC, ...) arrays."""
  return np.stack(per_class, axis=1).reshape((-1,) + per_class[0].shape[1:])


class RdedMethod(base.Method):
  name = NAME
  description = "RDED: observer-scored real crops, stitched"

  def default_settings(self, config):
    c = ml_collections.ConfigDict()
    c.ipc = int(config.recover.ipc)
    c.observer = ""          # a zoo teacher in config.teachers_dir; '' = config.recover.logit_teacher
    c.mipc = 300             # real images per class offered as candidates
    c.num_crop = 5           # random crops per candidate image
    c.factor = -1            # stitching factor: factor² crops per image; -1 = 2 from 112 px up, else 1
    c.scale = (0.08, 1.0)    # RandomResizedCrop scale and aspect ratio of the crops
    c.ratio = (1.0, 1.0)
    c.seed = -1              # -1 = the run's seed
    return c

  def validate(self, settings, config, field):
    check_patch_settings(settings, field)

  def _resolved(self, ctx) -> dict:
    s = ctx.settings
    return {"ipc": int(s.ipc), "observer": s.observer or ctx.config.recover.logit_teacher, "mipc": int(s.mipc),
            "num_crop": int(s.num_crop), "factor": auto_factor(s.factor, ctx.dataset.image_size),
            "scale": [float(v) for v in s.scale], "ratio": [float(v) for v in s.ratio],
            "seed": ctx.config.seed if s.seed == -1 else int(s.seed)}

  def fingerprint(self, ctx):
    return {NAME: self._resolved(ctx), "data": ctx.dataset.fingerprint(),
            **precision.resolve(ctx.config, "recover").fingerprint()}

  def plan(self, ctx):
    r, dataset, field = self._resolved(ctx), ctx.dataset, ctx.request.field
    check_candidates(r, dataset, field)
    policy = precision.resolve(ctx.config, "recover")
    teachers = teacher_store.load_teacher_set(
        (r["observer"],), ctx.teachers_dir, class_names=dataset.class_names,
        needed_by=f"{field}.observer", dtype=policy.compute_dtype)
    return r, teachers, policy

  def run(self, ctx, planned):
    r, teachers, policy = planned
    dataset, mesh, size = ctx.dataset, ctx.mesh, ctx.dataset.image_size
    model, variables = teachers.models[0], teachers.variables[0]
    mean, std = np.asarray(dataset.mean, np.float32), np.asarray(dataset.std, np.float32)
    factor, ipc = r["factor"], r["ipc"]
    crop_size, cells = size // factor, factor * factor

    def score(v, batch):
      logits = model.apply(v, batch["x"], train=False).astype(jnp.float32)
      return {"ce": -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["y"][:, None], axis=1)[:, 0]}

    with policy.scope():
      program = units.compile_rows(score, mesh)
    placed = mesh_lib.replicate(variables, mesh)
    print(f"[{ctx.tag}] RDED: observer {r['observer']}, {r['mipc']} images x {r['num_crop']} crops per class, "
          f"factor {factor}, {ipc} images per class", flush=True)

    def make(klass):
      chosen, boxes, patches = class_candidates(dataset, r, NAME, klass, crop_size)
      x = (patches.astype(np.float32) / 255.0 - mean) / std
      if factor > 1:
        x = crops_lib.pad_centered(x, size)
      y = np.full(len(x), klass, np.int32)
      with policy.scope():
        ce = units.map_rows(score, placed, {"x": x, "y": y}, mesh, jitted=program)["ce"]
      ce = ce.reshape(len(chosen), r["num_crop"])
      best = ce.argmin(1)                                                  # each image's best crop
      kept_ce = ce[np.arange(len(chosen)), best]
      order = np.argsort(kept_ce, kind="stable")[:ipc * cells]             # the class's best crops
      ranked = patches.reshape(len(chosen), r["num_crop"], crop_size, crop_size, 3)[order, best[order]]
      stitched, which = crops_lib.stitch(ranked, ipc, factor, size)
      return {"images": stitched, "train_index": chosen[order][which], "box": boxes[order, best[order]][which],
              "score": kept_ce[order][which], "rank": which}
    return run_per_class(ctx, r, NAME, make, lambda results: self._write(ctx, r, results))

  def _write(self, ctx, r, results):
    write_patch_set(ctx, r, results, NAME, {"observer": r["observer"]}, ("score", "rank"))
