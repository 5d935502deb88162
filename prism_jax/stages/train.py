"""Train stage: students on each distilled image set with its soft labels, over several seeds (SPEC 6).

For image set S and seed s writes `<workdir>/sets/S/train/seed_s/`: `ckpt/` (orbax, resumable) and
`student.json` (written last: best and last top-1 on the real test split, the evaluation history,
the protocol and the fingerprint). `sets/S/train/summary.json` gathers mean ± std over seeds.
The student's inputs come from the relabel plan: stored mode reads the per-epoch shards (checked
against what this stage asks for: image set, class order, batch size, epochs); online mode draws the
same plan and runs the teachers inside the step.
"""

from __future__ import annotations

import functools
import math
import os
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from prism_jax import errors, models
from prism_jax.data import image_sets, pipeline, sources
from prism_jax.io import artifacts, completion, layout, monitoring, teacher_store
from prism_jax.parallel import mesh as mesh_lib
from prism_jax.relabel import plan, reader, views
from prism_jax.train import loop, optim, precision, schedules, steps, student
_NON_RECIPE_FIELDS = ("seeds", "eval_every_epochs", "eval_batch_size", "log_every_steps",
                      "checkpoint_every_steps", "keep_checkpoints")


def training_mesh(mesh, batch_size: int, accumulation: int):
  """The mesh the student trains on: every device, or the largest prefix whose count divides the
  micro-batch (BatchNorm statistics must cover the whole micro-batch, so no padding rows)."""
  micro = batch_size // accumulation
  n = mesh.devices.size
  if micro % n == 0:
    return mesh
  if jax.process_count() > 1:
    raise errors.ConfigError(f"train.batch_size={batch_size} / train.accumulation={accumulation} = {micro} rows "
                     f"per micro-batch is not divisible by the {n} devices of a multi-process run")
  usable = max(d for d in range(1, n + 1) if micro % d == 0)
  print(f"[train] micro-batch of {micro} is not divisible by {n} devices: training on {usable}", flush=True)
  return mesh_lib.make_mesh(usable)


def validate(config) -> None:
  """The train settings and the relabel plan they read (no data)."""
  plan.check_config(config)
  tr = config.train
  if tr.accumulation < 1 or tr.batch_size % tr.accumulation:
    raise errors.ConfigError(f"train.accumulation={tr.accumulation}: expected a divisor of train.batch_size="
                     f"{tr.batch_size}")
  if not 0 <= tr.ema_decay < 1:
    raise errors.ConfigError(f"train.ema_decay={tr.ema_decay}: expected 0 (off) or a value in (0, 1)")
  if not tr.seeds:
    raise errors.ConfigError("train.seeds is empty: expected at least one seed")
  for field in ("learning_rate", "weight_decay", "momentum", "gamma", "temperature", "warmup_epochs"):
    value = float(tr[field])
    positive = field in ("learning_rate", "temperature")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
      raise errors.ConfigError(f"train.{field}={tr[field]!r}: expected a finite number {'> 0' if positive else '>= 0'}")
  if tr.stem not in ("small", "imagenet"):
    raise errors.ConfigError(f"train.stem={tr.stem!r}: expected 'small' or 'imagenet'")


def recipe(config) -> dict:
  tr = {k: v for k, v in config.train.to_dict().items() if k not in _NON_RECIPE_FIELDS}
  rl = config.relabel
  if plan.uses_hard_labels_only(config):
    mode, labels = "none", {}
  else:
    mode, labels = rl.mode, {"teachers": list(rl.teachers), "aggregation": rl.aggregation}
  return {"train": tr, "relabel_mode": mode, "views": plan.view_settings(config), **labels}


def run(config, workdir: str, mesh) -> dict:
  validate(config)
  dataset = sources.open_dataset(config.data)
  results = {}
  for name in config.image_sets:
    image_set = image_sets.load(name, workdir=workdir, dataset=dataset)
    per_seed = [train_student(config, workdir, dataset, image_set, seed, mesh) for seed in config.train.seeds]
    results[name] = summarize(per_seed, config)
    if jax.process_index() == 0:
      artifacts.write_json(layout.train_summary(workdir, name), results[name])
    print(f"[train {name}] top-1 best {_fmt(results[name]['best_top1'])}, last "
          f"{_fmt(results[name]['last_top1'])} over seeds {list(config.train.seeds)}", flush=True)
  return results


def _fmt(stat: dict) -> str:
  return f"{100 * stat['mean']:.2f} ± {100 * stat['std']:.2f}%"


def summarize(per_seed: list[dict], config) -> dict:
  def stat(key):
    values = np.asarray([r[key] for r in per_seed], np.float64)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "values": values.tolist()}
  out = {"best_top1": stat("best_top1"), "last_top1": stat("last_top1"), "seeds": list(config.train.seeds),
         "protocol": config.train.protocol, "student": config.train.student,
         "train_seconds": float(sum(r["timing_last_run"]["wall_seconds"] for r in per_seed))}
  if "best_top5" in per_seed[0]:
    out["best_top5"], out["last_top5"] = stat("best_top5"), stat("last_top5")
  return out


def train_student(config, workdir: str, dataset, image_set, seed: int, mesh) -> dict:
  tr, rl = config.train, config.relabel
  tag = f"train {image_set.name} seed {seed}"
  out_dir = layout.student_dir(workdir, image_set.name, seed)
  spec = plan.view_spec(config, dataset)
  fp = {"image_set": image_set.fingerprint(), "data": dataset.fingerprint(), "seed": seed,
        "relabel_seed": config.seed, **recipe(config), **precision.resolve(config, "train").fingerprint()}
  hard_only = plan.uses_hard_labels_only(config)
  online = rl.mode == "online" and not hard_only
  labels = None if online or hard_only else reader.StoredLabels(config, workdir, dataset, image_set)
  done_path = os.path.join(out_dir, layout.STUDENT_FILE)
  meta = completion.finished(done_path, fp, f"student '{image_set.name}' seed {seed}", tag=tag)
  if meta is not None:
    print(f"[{tag}] already trained: best top-1 {meta['best_top1']:.4f}, last {meta['last_top1']:.4f}", flush=True)
    return meta
  batches = plan.plan_shape(image_set, tr.batch_size)
  total_steps = tr.epochs * batches
  train_mesh = training_mesh(mesh, tr.batch_size, tr.accumulation)
  replicated = mesh_lib.replicated(train_mesh)
  teacher_models, teacher_vars = None, None
  if online:
    teachers = teacher_store.load_teacher_set(
        tuple(rl.teachers), layout.teachers_dir(config, workdir), class_names=dataset.class_names,
        needed_by="relabel.teachers (online soft labels)", dtype=precision.resolve(config, "relabel").compute_dtype)
    teacher_models = teachers.models
    teacher_vars = mesh_lib.replicate(teachers.variables, train_mesh)

  lr = schedules.make_schedule(tr.schedule, tr.learning_rate, tr.epochs, batches,
                               zeta=tr.zeta if tr.zeta > 0 else None, warmup_epochs=tr.warmup_epochs)
  tx = optim.make_optimizer(tr.optimizer, lr, weight_decay=tr.weight_decay, momentum=tr.momentum)
  model = models.create_model(tr.student, num_classes=dataset.num_classes, stem=tr.stem, width=tr.width,
                              dtype=precision.resolve(config, "train").compute_dtype)
  key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(f"student/{tr.student}".encode()))
  init_key, train_key = jax.random.split(key)
  image_shape = (dataset.image_size, dataset.image_size, 3)

  def create(k):
    variables = model.init({"params": k, "dropout": k}, jnp.zeros((2,) + image_shape, jnp.float32), train=False)
    return student.StudentState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                                       batch_stats=variables.get("batch_stats", {}),
                                       ema_params=variables["params"] if tr.ema_decay else None)
  state = jax.jit(create, out_shardings=replicated)(init_key)

  step = jax.jit(functools.partial(
      student.student_train_step, spec=spec, mean=dataset.mean, std=dataset.std, loss=tr.loss,
      gamma=tr.gamma, temperature=tr.temperature, accumulation=tr.accumulation, ema_decay=tr.ema_decay,
      teacher_models=teacher_models, aggregation=rl.aggregation, mesh=train_mesh),
      out_shardings=(replicated, replicated), donate_argnums=0)
  images_host, hard_host = image_set.images, image_set.labels

  # Each process feeds only the rows its own devices hold (multi-host: no process reads another's).
  local_rows = mesh_lib.local_batch_slice(tr.batch_size, train_mesh)

  def feed(rows):
    return None if rows is None else mesh_lib.put_global_batch(np.asarray(rows)[local_rows], tr.batch_size,
                                                               train_mesh)

  def get_batch(step_index: int):
    epoch, b = divmod(step_index, batches)
    if labels is None:  # online soft labels or hard labels: the plan is drawn here
      indices, params = plan.draw_batch(image_set.num_images, tr.batch_size, spec, config.seed, epoch, b)
      logits = None
      images, hard = images_host[indices], hard_host[indices]
    else:
      images, params, hard, logits = reader.stored_batch(labels.epoch(epoch), b, images_host, hard_host)
    params = views.ViewParams(**{
        k: feed(v) if k in views.PER_IMAGE_FIELDS else mesh_lib.replicate(np.asarray(v), train_mesh)
        for k, v in params._asdict().items()})
    return feed(images), params, feed(hard), feed(logits), teacher_vars

  eval_step = jax.jit(functools.partial(steps.classification_eval_step, mean=dataset.mean, std=dataset.std),
                      in_shardings=(replicated,) + (mesh_lib.data_sharding(train_mesh),) * 3,
                      out_shardings=replicated)
  eval_batch = _eval_batch_size(tr.eval_batch_size, train_mesh)

  def evaluate(train_state):
    return pipeline.evaluate_split(eval_step, student.with_ema_params(train_state), dataset, "test",
                                   eval_batch, train_mesh)

  writer = monitoring.create_writer(layout.tensorboard_dir(workdir, layout.set_run_name("train", image_set.name,
                                                                                      f"_seed{seed}")))
  settings = loop.LoopSettings(
      total_steps=total_steps, steps_per_epoch=batches, log_every_steps=min(tr.log_every_steps, total_steps),
      eval_every_steps=int(round(tr.eval_every_epochs * batches)),
      checkpoint_every_steps=tr.checkpoint_every_steps, keep_checkpoints=tr.keep_checkpoints,
      items_per_step=tr.batch_size, progress_interval_s=config.progress_interval_s)
  labels_kind = "hard labels only" if hard_only else f"{'online' if online else 'stored'} soft labels"
  print(f"[{tag}] {tr.student} ({tr.protocol} protocol, {tr.loss} loss, {tr.schedule} schedule) on "
        f"{image_set.num_images} images: {total_steps} steps ({tr.epochs} epochs x {batches}), batch "
        f"{tr.batch_size}, {labels_kind}, {train_mesh.devices.size} device(s)",
        flush=True)
  start = time.perf_counter()
  state, history, timing = loop.train_loop(
      name=tag, state=state, step_fn=step, get_batch=get_batch, evaluate=evaluate, base_key=train_key,
      settings=settings, checkpoint_dir=os.path.join(out_dir, "ckpt"), run_fingerprint=fp, writer=writer,
      learning_rate_fn=lr)
  result = {"fingerprint": fp, "protocol": tr.protocol, "student": tr.student, "history": history,
            "best_top1": max(h["top1"] for h in history), "last_top1": history[-1]["top1"],
            "best_epoch": max(history, key=lambda h: h["top1"])["epoch"],
            "timing_last_run": {**timing, "wall_seconds": time.perf_counter() - start}}
  if "top5" in history[-1]:
    result["best_top5"], result["last_top5"] = max(h["top5"] for h in history), history[-1]["top5"]
  if jax.process_index() == 0:
    artifacts.write_json(done_path, result)
  writer.close()
  print(f"[{tag}] best top-1 {result['best_top1']:.4f} (epoch {result['best_epoch']:.0f}), last "
        f"{result['last_top1']:.4f}", flush=True)
  return result


def _eval_batch_size(requested: int, mesh) -> int:
  n = mesh.devices.size
  return max(n, requested // n * n)
