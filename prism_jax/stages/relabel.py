"""Relabel stage: ensemble soft labels for every (epoch, batch) of student training (SPEC 5).

For each image set in `config.image_sets` (see data/image_sets.py) writes `<workdir>/sets/<set>/relabel/`
(layout in relabel/store.py): per epoch the sample order, the per-image crop/flip (and PatchShuffle)
parameters, the per-batch CutMix, and the teachers' aggregated float16 logits on the mixed batch.
Epoch shards are written atomically and checksummed; a killed run redoes only the unfinished epoch.
In `relabel.mode='online'` nothing is stored: the train stage computes the same labels in its step.
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from prism_jax.data import image_sets, sources
from prism_jax.io import artifacts, monitoring, teacher_store
from prism_jax.parallel import mesh as mesh_lib, multihost
from prism_jax.relabel import aggregate, labeler, store, views
from prism_jax.train import losses, precision, protocols

MODES = ("stored", "online")


def view_spec(config, dataset) -> views.ViewSpec:
  rl = config.relabel
  spec = views.ViewSpec(image_size=dataset.image_size, rrc_scale=tuple(float(s) for s in rl.rrc_scale),
                        flip=bool(rl.flip), cutmix=bool(rl.cutmix), patch_shuffle_grid=int(rl.patch_shuffle_grid))
  spec.validate()
  return spec


def teachers_dir(config, workdir: str) -> str:
  return config.relabel.teachers_dir or os.path.join(workdir, "teachers")


def check_config(config) -> None:
  rl, tr = config.relabel, config.train
  if rl.mode not in MODES:
    raise ValueError(f"relabel.mode={rl.mode!r}: expected one of {MODES}")
  if rl.aggregation not in aggregate.AGGREGATIONS:
    raise ValueError(f"relabel.aggregation={rl.aggregation!r}: expected one of {aggregate.AGGREGATIONS}")
  if tr.loss not in losses.LOSSES:
    raise ValueError(f"train.loss={tr.loss!r}: expected one of {losses.LOSSES}")
  if not rl.teachers and not uses_hard_labels_only(config):
    raise ValueError("relabel.teachers is empty: expected at least one teacher name")
  if rl.aggregation == "single" and len(rl.teachers) != 1:
    raise ValueError(f"relabel.aggregation='single' uses one teacher, got relabel.teachers={tuple(rl.teachers)}")
  if tr.epochs < 1 or tr.batch_size < 1:
    raise ValueError(f"train.epochs={tr.epochs} / train.batch_size={tr.batch_size}: expected >= 1")
  protocols.check(config)
  if not config.image_sets:
    raise ValueError("image_sets is empty: expected e.g. ('recover',) or ('recover', 'random_real')")


def uses_hard_labels_only(config) -> bool:
  """True when the student loss reads no teacher logits (`train.loss='ce'`): nothing to relabel."""
  return config.train.loss in losses.HARD_LABEL_LOSSES


def plan_shape(image_set, batch_size: int) -> int:
  """Batches per epoch (the remainder of the shuffled order is dropped, like the teacher pipeline)."""
  batches = image_set.num_images // batch_size
  if batches < 1:
    raise ValueError(f"train.batch_size={batch_size} is larger than the {image_set.num_images} images of "
                     f"the '{image_set.name}' set; lower it to at most {image_set.num_images}")
  return batches


def load_teacher_set(names, directory: str, dataset, dtype=jnp.float32):
  """(models, variables, checksums) of the relabel teachers, checked against the data's classes;
  `dtype` is their compute dtype (the precision policy)."""
  models, variables, sums = [], [], {}
  for name in names:
    path = os.path.join(directory, name)
    if not teacher_store.is_complete(path):
      raise artifacts.ArtifactError(
          f"{path}: no teacher '{name}' (named in relabel.teachers); run the squeeze stage for it "
          "or import torchvision weights")
    model, var, meta = teacher_store.load_teacher(path, expected_class_names=dataset.class_names, dtype=dtype)
    models.append(model); variables.append(var); sums[name] = meta["variables_sha256"]
  return tuple(models), tuple(variables), sums


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


def run(config, workdir: str, mesh) -> dict:
  check_config(config)
  dataset = sources.open_dataset(config.data)
  results = {}
  for name in config.image_sets:
    image_set = image_sets.load(name, workdir=workdir, dataset=dataset, ipc=config.recover.ipc, seed=config.seed)
    results[name] = relabel_set(config, workdir, dataset, image_set, mesh)
  return results


def relabel_set(config, workdir: str, dataset, image_set, mesh) -> dict:
  rl, tr = config.relabel, config.train
  tag = f"relabel {image_set.name}"
  if uses_hard_labels_only(config):
    print(f"[{tag}] train.loss={tr.loss!r} trains on hard labels: no soft labels to make", flush=True)
    return {"mode": "hard_labels"}
  if rl.mode == "online":
    print(f"[{tag}] online mode: soft labels are computed inside the student step", flush=True)
    return {"mode": "online"}
  out_dir = os.path.join(image_sets.set_dir(workdir, image_set.name), "relabel")
  models, teacher_vars, sums = load_teacher_set(tuple(rl.teachers), teachers_dir(config, workdir), dataset,
                                                dtype=precision.resolve(config, "relabel").compute_dtype)
  fp = fingerprint(config, dataset, image_set, sums)
  index = store.read_index(out_dir)
  if index is not None:
    artifacts.check_same("the soft labels", os.path.join(out_dir, store.INDEX_FILE), fp, index["fingerprint"])
    # Process 0's index decides for every process, so all of them run the same batches.
    if multihost.broadcast_from_main(bool(index.get("complete"))):
      print(f"[{tag}] already done: {tr.epochs} epochs in {out_dir}", flush=True)
      return index
  else:
    index = {"fingerprint": fp, "shards": {}, "complete": False}
  spec = view_spec(config, dataset)
  batches = plan_shape(image_set, tr.batch_size)
  patch_cells = spec.patch_shuffle_grid ** 2 or 1
  size = store.bytes_per_epoch(batches, tr.batch_size, dataset.num_classes, patch_cells) * tr.epochs
  dropped = image_set.num_images - batches * tr.batch_size
  print(f"[{tag}] {tr.epochs} epochs x {batches} batches of {tr.batch_size} "
        f"({dropped} image(s) per epoch dropped by the shuffle remainder), teachers {tuple(rl.teachers)} "
        f"({rl.aggregation}); about {size / 2**20:.1f} MiB of soft labels -> {out_dir}", flush=True)

  step = jax.jit(functools.partial(labeler.label_batch, models=models, spec=spec, mean=dataset.mean,
                                   std=dataset.std, aggregation=rl.aggregation, mesh=mesh),
                 out_shardings=mesh_lib.replicated(mesh))  # every process reads the whole batch's labels
  teacher_vars = mesh_lib.replicate(teacher_vars, mesh)
  images = mesh_lib.replicate(jnp.asarray(image_set.images), mesh)
  hard = image_set.labels
  writer = monitoring.create_writer(os.path.join(workdir, "tensorboard", f"relabel_{image_set.name}"))
  progress = monitoring.Progress(tag, tr.epochs * batches, unit="batch", items_per_step=tr.batch_size,
                                 interval_s=config.progress_interval_s)
  start, computed = time.perf_counter(), 0
  for epoch in range(tr.epochs):
    name = store.shard_name(epoch)
    if multihost.broadcast_from_main(name in index["shards"]):
      continue
    rows = {k: [] for k in store.SHARD_KEYS}
    agree = 0.0
    for b in range(batches):
      indices, params = draw_batch(image_set.num_images, tr.batch_size, spec, config.seed, epoch, b)
      logits = step(teacher_vars, images[indices], params)
      host = jax.device_get(params)
      rows["indices"].append(indices)
      rows["crop"].append(host.crop); rows["flip"].append(host.flip); rows["patch_perm"].append(host.patch_perm)
      rows["cutmix_box"].append(host.cutmix_box); rows["cutmix_perm"].append(host.cutmix_perm)
      rows["cutmix_lam"].append(host.cutmix_lam)
      logits = np.asarray(jax.device_get(logits))
      rows["logits"].append(logits)
      agree += float(np.mean(np.argmax(logits, -1) == hard[indices]))
      computed += 1
      progress.update(epoch * batches + b + 1)
    if not np.isfinite(np.stack(rows["logits"]).astype(np.float32)).all():
      raise FloatingPointError(f"[{tag}] non-finite teacher logits in epoch {epoch} (float16 overflow? "
                               "check the teachers); finished epochs are kept")
    if jax.process_index() == 0:
      index["shards"][name] = store.write_shard(out_dir, epoch, {k: np.stack(v) for k, v in rows.items()})
      store.write_index(out_dir, index)
    writer.write_scalars(epoch + 1, {"relabel/label_agreement": agree / batches,
                                     "relabel/batches_per_sec": computed / max(time.perf_counter() - start, 1e-9)})
  seconds = time.perf_counter() - start
  index.update(complete=True, num_batches_per_epoch=batches,
               timing_last_run={"seconds": seconds, "batches": computed,
                                "images_per_sec": computed * tr.batch_size / max(seconds, 1e-9)})
  if jax.process_index() == 0:
    store.write_index(out_dir, index)
  writer.flush()
  progress.update(tr.epochs * batches, force=True)
  print(f"[{tag}] done in {monitoring.format_duration(seconds)} -> {out_dir}", flush=True)
  return index
