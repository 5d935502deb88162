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
from prism_jax.io import artifacts, layout, monitoring, teacher_store
from prism_jax.parallel import mesh as mesh_lib, multihost
from prism_jax.relabel import labeler, plan, store
from prism_jax.train import precision


def validate(config) -> None:
  plan.check_config(config)


def run(config, workdir: str, mesh) -> dict:
  validate(config)
  dataset = sources.open_dataset(config.data)
  results = {}
  for name in config.image_sets:
    image_set = image_sets.load(name, workdir=workdir, dataset=dataset)
    results[name] = relabel_set(config, workdir, dataset, image_set, mesh)
  return results


def relabel_set(config, workdir: str, dataset, image_set, mesh) -> dict:
  rl, tr = config.relabel, config.train
  tag = f"relabel {image_set.name}"
  if plan.uses_hard_labels_only(config):
    print(f"[{tag}] train.loss={tr.loss!r} trains on hard labels: no soft labels to make", flush=True)
    return {"mode": "hard_labels"}
  if rl.mode == "online":
    print(f"[{tag}] online mode: soft labels are computed inside the student step", flush=True)
    return {"mode": "online"}
  out_dir = layout.relabel_dir(workdir, image_set.name)
  teachers = teacher_store.load_teacher_set(tuple(rl.teachers), layout.teachers_dir(config, workdir),
                                            class_names=dataset.class_names, needed_by="relabel.teachers",
                                            dtype=precision.resolve(config, "relabel").compute_dtype)
  models, teacher_vars = teachers.models, teachers.variables
  fp = plan.fingerprint(config, dataset, image_set, teachers.checksums)
  index = store.read_index(out_dir)
  if index is not None:
    artifacts.check_same("the soft labels", os.path.join(out_dir, store.INDEX_FILE), fp, index["fingerprint"])
    # A shard that is missing or fails its checksum is dropped from the index and made again.
    damaged = store.damaged_shards(out_dir, index) if multihost.is_main_process() else []
    if damaged:
      print(f"[{tag}] {', '.join(damaged)} missing or corrupt in {out_dir}: redoing "
            f"{'it' if len(damaged) == 1 else 'them'}", flush=True)
      for name in damaged:
        index["shards"].pop(name)
      index["complete"] = False
      store.write_index(out_dir, index)
    # Process 0's index decides for every process, so all of them run the same batches.
    if multihost.broadcast_from_main(bool(index.get("complete"))):
      print(f"[{tag}] already done: {tr.epochs} epochs in {out_dir}", flush=True)
      return index
  else:
    index = {"fingerprint": fp, "shards": {}, "complete": False}
  spec = plan.view_spec(config, dataset)
  batches = plan.plan_shape(image_set, tr.batch_size)
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
  writer = monitoring.create_writer(layout.tensorboard_dir(workdir, layout.set_run_name("relabel", image_set.name)))
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
      indices, params = plan.draw_batch(image_set.num_images, tr.batch_size, spec, config.seed, epoch, b)
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
