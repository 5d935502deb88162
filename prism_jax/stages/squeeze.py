"""Squeeze stage: supervised training of zoo models ("teachers") on the real training split.

Writes `<teachers_dir>/<name>/` (config.teachers_dir, default <workdir>/teachers; see io/teacher_store.py) with the final variables and the test
accuracy; in-progress checkpoints live in `<workdir>/teachers/<name>/ckpt`. A finished teacher is
not retrained (the stage is idempotent), and one made with a different recipe or data is refused.
"""

from __future__ import annotations

import copy
import functools
import os
import time
import zlib

import jax
import ml_collections

from prism_jax import errors, models
from prism_jax.data import augment as aug
from prism_jax.data import pipeline, sources
from prism_jax.io import completion, layout, monitoring, teacher_store
from prism_jax.parallel import mesh as mesh_lib
from prism_jax.train import loop, optim, precision, state as state_lib, steps

# Fields that do not change the trained weights (allowed to differ when resuming).
# max_per_class: its effect is recorded in the data fingerprint.
_NON_RECIPE_FIELDS = ("teachers", "max_per_class", "eval_every_epochs", "eval_batch_size", "log_every_steps",
                      "checkpoint_every_steps", "keep_checkpoints")


_POSITIVE = ("epochs", "batch_size", "eval_batch_size", "learning_rate", "log_every_steps", "checkpoint_every_steps",
             "keep_checkpoints")
AUGMENTS = ("crop_flip", "rrc_flip", "none")


def validate(config) -> None:
  """config.squeeze (no data); the batches' divisibility by the devices is checked at run time."""
  sq = config.squeeze
  for field in _POSITIVE:
    if not sq[field] > 0:  # also catches NaN
      raise errors.ConfigError(f"squeeze.{field}={sq[field]!r}: expected a positive number")
  if sq.stem not in ("small", "imagenet"):
    raise errors.ConfigError(f"squeeze.stem={sq.stem!r}: expected 'small' or 'imagenet'")
  if not sq.width > 0:
    raise errors.ConfigError(f"squeeze.width={sq.width!r}: expected a positive multiplier")
  if sq.get("max_per_class", 0) < 0:
    raise errors.ConfigError(f"squeeze.max_per_class={sq.max_per_class!r}: expected 0 (all) or a positive count")
  if not sq.teachers:
    raise errors.ConfigError("squeeze.teachers is empty: expected at least one model name")
  for field in ("weight_decay", "warmup_epochs", "label_smoothing", "eval_every_epochs", "momentum"):
    if not sq[field] >= 0:
      raise errors.ConfigError(f"squeeze.{field}={sq[field]!r}: expected >= 0")
  if sq.augment not in AUGMENTS:
    raise errors.ConfigError(f"squeeze.augment={sq.augment!r}: expected one of {AUGMENTS}")
  if sq.optimizer not in ("sgd", "adamw"):
    raise errors.ConfigError(f"squeeze.optimizer={sq.optimizer!r}: expected 'sgd' or 'adamw'")
  from prism_jax.models import registry
  for name in sq.teachers:
    if name not in registry.available_models():
      raise errors.ConfigError(f"squeeze.teachers: unknown model {name!r}; known models: {', '.join(registry.available_models())}")


def training_data(config):
  """config.data, with squeeze.max_per_class (teachers trained on a class-balanced subset) applied."""
  data = config.data
  if config.squeeze.get("max_per_class", 0):
    data = copy.deepcopy(data)
    with data.unlocked():
      data.max_per_class = int(config.squeeze.max_per_class)
  return data


def teacher_dir(config, workdir: str, name: str) -> str:
  return layout.teacher_dir(layout.teachers_dir(config, workdir), name)


def recipe(config: ml_collections.ConfigDict) -> dict:
  """The part of the configuration that determines a teacher's weights."""
  sq = config.squeeze.to_dict()
  return {"squeeze": {k: v for k, v in sq.items() if k not in _NON_RECIPE_FIELDS}, "seed": config.seed}


def make_augment(policy: str, image_size: int):
  """Per-image training augmentation (image in [0, 1], HWC) for the named policy."""
  if policy == "none":
    return None
  if policy == "crop_flip":
    pad = max(1, image_size // 8)  # 4 px at 32 px, the CIFAR recipe

    def crop_flip(image, key):
      crop_key, flip_key = jax.random.split(key)
      image = aug.apply_random_crop(image, aug.sample_random_crop_params(crop_key, image.shape[:2], pad), pad)
      return aug.apply_flip(image, aug.sample_flip_params(flip_key))
    return crop_flip
  if policy == "rrc_flip":
    def rrc_flip(image, key):
      crop_key, flip_key = jax.random.split(key)
      params = aug.sample_rrc_params(crop_key, image.shape[:2])
      image = aug.apply_rrc(image, params, (image_size, image_size))
      return aug.apply_flip(image, aug.sample_flip_params(flip_key))
    return rrc_flip
  raise errors.ConfigError(f"squeeze.augment={policy!r}: expected 'crop_flip', 'rrc_flip' or 'none'")


def run(config: ml_collections.ConfigDict, workdir: str, mesh) -> dict[str, float]:
  """Trains every teacher in `config.squeeze.teachers`; returns {name: test top-1}."""
  dataset = sources.open_dataset(training_data(config))
  results = {}
  for name in config.squeeze.teachers:
    results[name] = squeeze_teacher(config, name, dataset, workdir, mesh)
  return results


def squeeze_teacher(config, name: str, dataset, workdir: str, mesh) -> float:
  sq = config.squeeze
  out_dir = teacher_dir(config, workdir, name)
  model_spec = dict(name=name, num_classes=dataset.num_classes, stem=sq.stem, width=sq.width,
                    image_size=dataset.image_size)
  policy = precision.resolve(config, "squeeze")
  fingerprint = {"model": model_spec, "data": dataset.fingerprint(), **recipe(config), **policy.fingerprint()}
  meta = completion.finished(os.path.join(out_dir, teacher_store.META_FILE), fingerprint, f"teacher '{name}'",
                             tag=f"squeeze {name}", damage_of=lambda meta: teacher_store.damaged(out_dir, meta))
  if meta is not None:
    print(f"[squeeze {name}] already trained: test top-1 {meta['test_accuracy']:.4f} ({out_dir})", flush=True)
    return meta["test_accuracy"]

  num_devices = mesh.devices.size
  for field in ("batch_size", "eval_batch_size"):
    if sq[field] % num_devices:
      raise errors.ConfigError(f"squeeze.{field}={sq[field]} must be divisible by the {num_devices} devices")
  batches = pipeline.TrainBatches(dataset, "train", sq.batch_size, seed=config.seed, mesh=mesh)
  total_steps = max(1, int(round(sq.epochs * batches.steps_per_epoch)))
  schedule = optim.warmup_cosine(sq.learning_rate, total_steps,
                                 int(round(sq.warmup_epochs * batches.steps_per_epoch)))
  tx = optim.make_optimizer(sq.optimizer, schedule, weight_decay=sq.weight_decay,
                            momentum=sq.momentum, nesterov=sq.nesterov)
  model = models.create_model(name, num_classes=dataset.num_classes, stem=sq.stem, width=sq.width,
                              dtype=policy.compute_dtype)
  key = jax.random.fold_in(jax.random.key(config.seed), zlib.crc32(name.encode()))
  init_key, train_key = jax.random.split(key)
  image_shape = (dataset.image_size, dataset.image_size, 3)
  replicated = mesh_lib.replicated(mesh)
  data = mesh_lib.data_sharding(mesh)
  state = jax.jit(functools.partial(state_lib.create_train_state, model, tx, image_shape=image_shape),
                  out_shardings=replicated)(init_key)

  train_step = jax.jit(
      functools.partial(steps.classification_train_step, mean=dataset.mean, std=dataset.std,
                        augment=make_augment(sq.augment, dataset.image_size),
                        label_smoothing=sq.label_smoothing),
      in_shardings=(replicated, data, data, replicated), out_shardings=(replicated, replicated),
      donate_argnums=0)
  eval_step = jax.jit(functools.partial(steps.classification_eval_step, mean=dataset.mean, std=dataset.std),
                      in_shardings=(replicated, data, data, data), out_shardings=replicated)

  def evaluate(train_state):
    return pipeline.evaluate_split(eval_step, train_state, dataset, "test", sq.eval_batch_size, mesh)

  writer = monitoring.create_writer(layout.tensorboard_dir(workdir, f"squeeze_{name}"))
  settings = loop.LoopSettings(
      total_steps=total_steps, steps_per_epoch=batches.steps_per_epoch,
      log_every_steps=sq.log_every_steps,
      eval_every_steps=int(round(sq.eval_every_epochs * batches.steps_per_epoch)),
      checkpoint_every_steps=sq.checkpoint_every_steps, keep_checkpoints=sq.keep_checkpoints,
      items_per_step=sq.batch_size, progress_interval_s=config.progress_interval_s)
  print(f"[squeeze {name}] {dataset.name}: {batches.num_examples} train images, {total_steps} steps "
        f"({sq.epochs} epochs x {batches.steps_per_epoch}), batch {sq.batch_size} over {num_devices} "
        f"device(s)", flush=True)
  start = time.perf_counter()
  try:
    state, history, timing = loop.train_loop(
        name=f"squeeze {name}", state=state, step_fn=train_step, get_batch=batches.get,
        evaluate=evaluate, base_key=train_key, settings=settings,
        checkpoint_dir=os.path.join(out_dir, "ckpt"), run_fingerprint=fingerprint, writer=writer,
        learning_rate_fn=schedule)
  finally:
    batches.close()
  final = history[-1]
  if jax.process_index() == 0:
    teacher_store.save_teacher(
        out_dir, name=name, variables=state_lib.model_variables(state), model_config=model_spec,
        class_names=dataset.class_names, dataset=dataset.fingerprint(),
        test_accuracy=float(final["top1"]),
        extra={"fingerprint": fingerprint, "history": history,
               "timing_last_run": {**timing, "wall_seconds": time.perf_counter() - start}})
  writer.close()
  print(f"[squeeze {name}] test top-1 {final['top1']:.4f} -> {out_dir}", flush=True)
  return float(final["top1"])
