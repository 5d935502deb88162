"""Diffusion stage: trains a class-conditional DiT on the real training split, or checks an imported one.

`config.diffusion.model` names a DiT size ('T/2', 'S/2', ...): the stage trains it in pixel space
(`config.diffusion.space='pixel'`: images scaled to [-1, 1], input size = the data's image size, 3
channels) or in the latent space of the VAE in `config.diffusion.vae_dir` (`space='latent'`: the
training images are encoded once, posterior mean x scaling factor, and cached in
`<workdir>/diffusion/latents.npz`; input size = image size / the VAE's downsampling factor, channels =
its latent channels; see prism_jax/diffusion/latents.py) with DiT's recipe
(prism_jax/diffusion/training.py: AdamW, EMA, label dropout to the null class), data-parallel over
the mesh, with orbax checkpoints in `<workdir>/diffusion/ckpt` (a killed run resumes exactly), and
writes
  <workdir>/diffusion/model/      the EMA weights as a diffusion_store 'dit' directory; its model.json
                                  holds the training fingerprint, the evaluation-loss history, `space`
                                  and (latent space) `vae`: the VAE's directory and checksum
  <workdir>/diffusion/samples.png samples_per_class rows x one column per class: DDIM + CFG samples
                                  of the EMA model (per-example keys, so any device count agrees),
                                  decoded by the VAE in latent space
The evaluation loss is the ε-MSE of the live and the EMA parameters on a fixed batch of training
images with fixed timesteps and noise (no label dropout), every `log_every_steps`.

`config.diffusion.import_dir` names an imported DiT instead: the stage checks that its input size and
channels are the data's (pixel space) or the VAE's latents' (latent space: `vae_dir` is required), that
its classes are the data's (or that `class_map` maps every data class to one of the model's classes)
and records that in `<workdir>/diffusion/imported.json`; nothing is trained. With both '' the stage does nothing.
A finished stage is not redone, and one made with a different configuration is refused.
"""

from __future__ import annotations

import functools
import os
import time
import zlib

import jax
import ml_collections
import numpy as np

from prism_jax import errors
from prism_jax.data import pipeline, sources
from prism_jax.diffusion import dit as dit_lib
from prism_jax.diffusion import grids
from prism_jax.diffusion import prior
from prism_jax.diffusion import latents as latents_lib
from prism_jax.diffusion import training
from prism_jax.diffusion import schedule as schedule_lib
from prism_jax.io import artifacts, diffusion_store, fs, layout, monitoring
from prism_jax.parallel import mesh as mesh_lib
from prism_jax.train import loop

IMPORT_FILE = os.path.basename(layout.diffusion_import_record(""))
SAMPLES_FILE = "samples.png"
# Fields that do not change the trained weights (allowed to differ when resuming or rerunning). The
# VAE's path is one: what matters is its checksum, which the latent-space fingerprint holds.
_NON_RECIPE_FIELDS = ("import_dir", "class_map", "log_every_steps", "checkpoint_every_steps",
                      "keep_checkpoints", "sample_steps", "cfg_scale", "samples_per_class", "vae_dir",
                      "sample_every_steps", "weights")
WEIGHTS = ("auto", "ema", "raw")


def validate(config) -> None:
  """config.diffusion (no data); the batch's divisibility by the devices is checked at run time."""
  dc = config.diffusion
  dit = dit_lib

  if dc.model and dc.import_dir:
    raise errors.ConfigError(f"config.diffusion.model={dc.model!r} and config.diffusion.import_dir={dc.import_dir!r}: "
                     "set one of them (model trains a DiT, import_dir uses an imported one)")
  if dc.model:
    try:
      dit.dit_spec(dc.model, input_size=64, in_channels=3, num_classes=1)
    except ValueError:
      raise errors.ConfigError(f"config.diffusion.model={dc.model!r}: expected '' (no training) or a DiT size name "
                       f"'<size>/<patch>' with size in {', '.join(dit.DIT_SIZES)}, e.g. 'T/2', 'S/2', 'B/2'") from None
  if dc.space not in ("pixel", "latent"):
    raise errors.ConfigError(f"config.diffusion.space={dc.space!r}: expected 'pixel' or 'latent'")
  for field in ("steps", "batch_size", "learning_rate", "log_every_steps", "checkpoint_every_steps",
                "keep_checkpoints", "sample_steps", "samples_per_class"):
    if not dc[field] > 0:  # also catches NaN
      raise errors.ConfigError(f"config.diffusion.{field}={dc[field]!r}: expected a positive number")
  if dc.sample_every_steps < 0 or (dc.sample_every_steps and dc.sample_every_steps % dc.log_every_steps):
    raise errors.ConfigError(f"config.diffusion.sample_every_steps={dc.sample_every_steps!r}: expected 0 (only the final "
                     f"grid) or a multiple of config.diffusion.log_every_steps={dc.log_every_steps}")
  if dc.weight_decay < 0:
    raise errors.ConfigError(f"config.diffusion.weight_decay={dc.weight_decay!r}: expected >= 0")
  if dc.cfg_scale < 0:
    raise errors.ConfigError(f"config.diffusion.cfg_scale={dc.cfg_scale!r}: expected >= 0 (1 = no guidance)")
  if dc.weights not in WEIGHTS:
    raise errors.ConfigError(f"config.diffusion.weights={dc.weights!r}: expected one of {WEIGHTS}")
  for field in ("ema_decay", "label_dropout"):
    if not 0 <= dc[field] < 1:
      raise errors.ConfigError(f"config.diffusion.{field}={dc[field]!r}: expected a value in [0, 1)")
  if dc.class_map and not dc.import_dir:
    raise errors.ConfigError("config.diffusion.class_map is set but config.diffusion.import_dir is '': the class map "
                     "applies to an imported DiT only")


def chosen_weights(setting: str, losses: dict) -> str:
  """'ema' or 'raw': what config.diffusion.weights=`setting` keeps, given the held-out losses of an
  evaluation ({'loss': raw weights, 'ema_loss': EMA})."""
  if setting != "auto":
    return setting
  return "raw" if float(losses["ema_loss"]) > float(losses["loss"]) else "ema"


def _saved_weights(meta: dict) -> str:
  source = meta.get("source") or {}
  return source.get("weights") or ("ema" if source.get("ema", True) else "raw")


def stage_dir(workdir: str) -> str:
  return layout.diffusion_dir(workdir)


def model_dir(workdir: str) -> str:
  return layout.diffusion_model_dir(workdir)


def latents_path(workdir: str) -> str:
  return os.path.join(stage_dir(workdir), latents_lib.LATENTS_FILE)


def recipe(config: ml_collections.ConfigDict) -> dict:
  """The part of the configuration that determines the trained weights."""
  dc = config.diffusion.to_dict()
  return {"diffusion": {k: v for k, v in dc.items() if k not in _NON_RECIPE_FIELDS}, "seed": config.seed}


resolve_model = prior.resolve_model  # (DiT directory, class map or None) of a work directory
resolve_vae = prior.resolve_vae      # the VAE record of a latent-space DiT, or None


def _input_shape(config: ml_collections.ConfigDict, dataset) -> tuple[int, int, dict | None]:
  """(side, channels, VAE info or None) of what the DiT sees: pixels, or the VAE's latents."""
  dc = config.diffusion
  if dc.space == "pixel":
    return dataset.image_size, 3, None
  info = latents_lib.vae_info(dc.vae_dir)
  side, channels = latents_lib.latent_shape(info, dataset.image_size)
  return side, channels, info


def _vae_record(info: dict) -> dict:
  return {k: info[k] for k in ("dir", "variables_sha256", "downsampling_factor", "latent_channels",
                               "scaling_factor")}


def run(config: ml_collections.ConfigDict, workdir: str, mesh) -> dict:
  dc = config.diffusion
  if dc.import_dir:
    return check_import(config, workdir)
  if not dc.model:
    print("[diffusion] nothing to do: config.diffusion.model and config.diffusion.import_dir are ''", flush=True)
    return {}
  if dc.space not in ("pixel", "latent"):
    raise errors.ConfigError(f"config.diffusion.space={dc.space!r}: expected 'pixel' or 'latent'")
  return train(config, workdir, mesh)


# ----------------------------------------------------------------------------- imported model

def check_import(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Checks the imported DiT's classes against the data's and records the result."""
  dc = config.diffusion
  source = dc.import_dir
  if not fs.exists(source) or not fs.isdir(source):
    raise errors.ConfigError(f"config.diffusion.import_dir={source!r}: directory not found; expected a DiT imported "
                     "with `python -m prism_jax.tools.import_dit` (a diffusion_store directory)")
  meta = diffusion_store.load_meta(source, kind="dit")
  try:
    spec = dit_lib.check_spec(meta["spec"])
  except ValueError as err:
    raise artifacts.ArtifactError(f"{os.path.join(source, diffusion_store.META_FILE)}: {err}") from None
  dataset = sources.open_dataset(config.data)
  side, channels, vae_info = _input_shape(config, dataset)
  if (spec["input_size"], spec["in_channels"]) != (side, channels):
    seen = (f"the data's {dataset.image_size} px images ({side}x{side}x{channels}, config.diffusion.space="
            "'pixel')" if vae_info is None else
            f"the {side}x{side}x{channels} latents of the data's {dataset.image_size} px images (config.diffusion."
            f"space='latent', VAE {vae_info['dir']})")
    raise errors.ArtifactError(f"{os.path.join(source, diffusion_store.META_FILE)}: the DiT takes {spec['input_size']}x"
                     f"{spec['input_size']}x{spec['in_channels']} inputs, but it would see {seen}")
  data_names = list(dataset.class_names)
  model_names = meta.get("class_names")
  num_model_classes = int(spec.get("num_classes", len(model_names or ())))
  class_map = [int(i) for i in dc.class_map]
  by_name = False
  if class_map:
    if len(class_map) != dataset.num_classes:
      raise errors.ConfigError(f"config.diffusion.class_map has {len(class_map)} entries; expected one per data class "
                       f"({dataset.num_classes}: {data_names})")
    bad = [i for i in class_map if not 0 <= i < num_model_classes]
    if bad:
      raise errors.ConfigError(f"config.diffusion.class_map={tuple(class_map)}: index {bad[0]} is outside the "
                       f"{num_model_classes} classes of the DiT in {source}")
    if len(set(class_map)) != len(class_map):
      raise errors.ConfigError(f"config.diffusion.class_map={tuple(class_map)}: two data classes map to the same model "
                       "class; expected distinct indices")
  elif model_names != data_names and model_names and set(data_names) <= set(model_names):
    # An ImageNet subset (Imagenette, Imagewoof, ...): its classes are synset ids the 1000-class
    # model also has, so each data class maps to the model class of the same name.
    class_map = [list(model_names).index(name) for name in data_names]
    by_name = True
  elif model_names != data_names:
    shown = (model_names[:10] + ["..."] if model_names and len(model_names) > 10 else model_names)
    raise errors.ConfigError(f"config.diffusion.import_dir={source!r}: the DiT's {num_model_classes} classes "
                     f"{shown} are not the data's {dataset.num_classes} classes {data_names[:10]}; set "
                     "config.diffusion.class_map to the model's class index of each data class (e.g. the "
                     "ImageNet indices of an ImageNet subset)")
  record = {"import_dir": source, "class_map": class_map or None, "spec": spec,
            "variables_sha256": meta.get("variables_sha256"), "data": dataset.fingerprint(),
            "model_class_names": model_names}
  if vae_info is not None:
    record.update(space="latent", vae=_vae_record(vae_info))
  marker = os.path.join(stage_dir(workdir), IMPORT_FILE)
  if fs.exists(marker):
    artifacts.check_same("the imported DiT record", marker, record, artifacts.read_json(marker))
    print(f"[diffusion] already checked: imported DiT {source}", flush=True)
  elif jax.process_index() == 0:
    artifacts.write_json(marker, artifacts.to_jsonable(record))
    print(f"[diffusion] imported DiT {source}: {dataset.num_classes} data classes "
          f"{'mapped by class name' if by_name else 'mapped by config.diffusion.class_map' if class_map else 'match the model'}"
          f" -> {marker}", flush=True)
  return {"model_dir": source, "class_map": class_map or None}


def train(config: ml_collections.ConfigDict, workdir: str, mesh) -> dict:
  dc = config.diffusion
  dataset = sources.open_dataset(config.data)
  side, channels, vae_info = _input_shape(config, dataset)
  try:
    spec = dit_lib.dit_spec(dc.model, input_size=side, in_channels=channels,
                            num_classes=dataset.num_classes, learn_sigma=True)
  except ValueError as err:
    where = (f"{dataset.image_size} px data" if vae_info is None else
             f"the {side}x{side}x{channels} latents of {dataset.image_size} px data")
    raise errors.ConfigError(f"config.diffusion.model={dc.model!r} on {where}: {err}") from None
  out_dir, final_dir = stage_dir(workdir), model_dir(workdir)
  fingerprint = {"spec": spec, "data": dataset.fingerprint(), **recipe(config)}
  if vae_info is not None:
    fingerprint["vae"] = {"variables_sha256": vae_info["variables_sha256"], "spec": vae_info["spec"]}
  previous_timing = None
  if diffusion_store.is_complete(final_dir):
    meta = diffusion_store.load_meta(final_dir, kind="dit")
    artifacts.check_same("the trained DiT", os.path.join(final_dir, diffusion_store.META_FILE),
                         fingerprint, meta.get("fingerprint", {}))
    history = meta.get("history") or [{}]
    saved = _saved_weights(meta)
    wanted = chosen_weights(dc.weights, history[-1]) if "ema_loss" in history[-1] else saved
    if wanted == saved:
      print(f"[diffusion] already trained: DiT-{dc.model} ({saved} weights), final eval loss "
            f"{history[-1].get('loss', float('nan')):.4f} ({final_dir})", flush=True)
      return {"model_dir": final_dir, "weights": saved, **{k: v for k, v in history[-1].items()}}
    # Another choice of weights: the final checkpoint holds both; the loop below resumes it (no step
    # left to run) and the model is saved again.
    print(f"[diffusion] {final_dir} holds the {saved} weights; config.diffusion.weights={dc.weights!r} keeps the "
          f"{wanted} weights: saving them from the final checkpoint", flush=True)
    previous_timing = meta.get("timing_last_run")

  num_devices = mesh.devices.size
  if dc.batch_size % num_devices:
    raise errors.ConfigError(f"config.diffusion.batch_size={dc.batch_size} must be divisible by the {num_devices} devices")
  if vae_info is None:
    train_data, prepare = dataset, grids.normalize
  else:
    vae_model, vae_variables = latents_lib.load_vae(vae_info)
    cache = latents_path(workdir)
    train_latents = latents_lib.load_or_encode(
        cache, latents_lib.cache_fingerprint(dataset, "train", vae_info),
        lambda: latents_lib.encode_split(vae_model, vae_variables, dataset, "train", mesh))
    print(f"[diffusion] latent space: {len(train_latents)} train images -> {side}x{side}x{channels} latents "
          f"(std {float(train_latents.std()):.3f}) with the VAE in {vae_info['dir']} -> {cache}", flush=True)
    train_data, prepare = latents_lib.LatentData(dataset, "train", train_latents), grids.identity
  batches = pipeline.TrainBatches(train_data, "train", dc.batch_size, seed=config.seed, mesh=mesh)
  model = dit_lib.create_dit(spec)
  schedule = schedule_lib.DiffusionSchedule.linear()
  tx = training.make_optimizer(dc.learning_rate, weight_decay=dc.weight_decay)
  key = jax.random.fold_in(jax.random.key(config.seed), zlib.crc32(b"diffusion"))
  init_key, train_key, eval_key, sample_key = jax.random.split(key, 4)
  replicated, data = mesh_lib.replicated(mesh), mesh_lib.data_sharding(mesh)
  state = jax.jit(lambda k: training.create_train_state(dit_lib.init_dit(model, k)["params"], tx),
                  out_shardings=replicated)(init_key)

  step_kwargs = dict(apply_fn=model.apply, schedule=schedule, tx=tx, num_classes=dataset.num_classes,
                     label_dropout=dc.label_dropout, ema_decay=dc.ema_decay, learn_sigma_loss=dc.learn_sigma_loss)

  def step_fn(train_state, images, labels, index, step_key):
    batch = {"images": prepare(images), "labels": labels, "index": index}
    return training.train_step(train_state, batch, step_key, **step_kwargs)

  train_step = jax.jit(step_fn, in_shardings=(replicated, data, data, data, replicated),
                       out_shardings=(replicated, replicated), donate_argnums=0)
  rows = batches.local_rows

  def get_batch(step):
    images, labels = batches.get(step)
    index = batches.indices(step)[rows].astype(np.int32)
    return images, labels, mesh_lib.put_global_batch(index, dc.batch_size, mesh)

  # Fixed evaluation batch: the first batch_size training images, fixed t / noise, no label dropout.
  eval_index = np.arange(dc.batch_size, dtype=np.int32)[rows]
  eval_batch = (mesh_lib.put_global_batch(train_data.read("train", eval_index), dc.batch_size, mesh),
                mesh_lib.put_global_batch(dataset.labels("train")[eval_index].astype(np.int32), dc.batch_size, mesh),
                mesh_lib.put_global_batch(eval_index, dc.batch_size, mesh))
  eval_loss = jax.jit(functools.partial(grids.eval_loss, apply_fn=model.apply, schedule=schedule,
                                        num_classes=dataset.num_classes, prepare=prepare),
                      in_shardings=(replicated, data, data, data, replicated), out_shardings=replicated)

  def sample_images(params) -> np.ndarray:
    """The sample grid (uint8) of `params`: samples_per_class rows, one column per class."""
    samples = grids.sample_ema(params, model, schedule, sample_key, mesh, num_classes=dataset.num_classes,
                         samples_per_class=dc.samples_per_class, num_steps=dc.sample_steps, cfg_scale=dc.cfg_scale)
    if vae_info is not None:
      samples = latents_lib.decode_to_images(vae_model, vae_variables, samples, mesh)
    return grids.sample_grid(grids.to_uint8(samples), dc.samples_per_class, dataset.num_classes)

  def kept(train_state, weights: str):
    return train_state.ema_params if weights == "ema" else train_state.params

  def evaluate(train_state):
    step = int(train_state.step)
    losses = {"loss": eval_loss(train_state.params, *eval_batch, eval_key),
              "ema_loss": eval_loss(train_state.ema_params, *eval_batch, eval_key)}
    if dc.sample_every_steps and step % dc.sample_every_steps == 0 and step < dc.steps:
      weights = chosen_weights(dc.weights, losses)
      writer.write_images(step, {"diffusion/samples": sample_images(kept(train_state, weights))})
    return losses

  writer = monitoring.create_writer(layout.tensorboard_dir(workdir, "diffusion"))
  settings = loop.LoopSettings(
      total_steps=dc.steps, steps_per_epoch=batches.steps_per_epoch, log_every_steps=dc.log_every_steps,
      eval_every_steps=dc.log_every_steps, checkpoint_every_steps=dc.checkpoint_every_steps,
      keep_checkpoints=dc.keep_checkpoints, items_per_step=dc.batch_size,
      progress_interval_s=config.progress_interval_s)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))
  inputs = (f"{dataset.image_size} px" if vae_info is None else
            f"{dataset.image_size} px ({side}x{side}x{channels} latents)")
  print(f"[diffusion] DiT-{dc.model} ({num_params / 1e6:.2f}M parameters) on {dataset.name}: "
        f"{batches.num_examples} train images at {inputs}, {dc.steps} steps, batch "
        f"{dc.batch_size} over {num_devices} device(s)", flush=True)
  start = time.perf_counter()
  try:
    state, history, timing = loop.train_loop(
        name="diffusion", state=state, step_fn=train_step, get_batch=get_batch, evaluate=evaluate,
        base_key=train_key, settings=settings, checkpoint_dir=os.path.join(out_dir, "ckpt"),
        run_fingerprint=fingerprint, writer=writer)
  finally:
    batches.close()

  final = history[-1]
  weights = chosen_weights(dc.weights, final)
  params = kept(state, weights)
  grid = sample_images(params)
  writer.write_images(dc.steps, {"diffusion/samples": grid})
  writer.close()
  if jax.process_index() == 0:
    artifacts.write_bytes(os.path.join(out_dir, SAMPLES_FILE), grids.png_bytes(grid))
    diffusion_store.save_model(
        final_dir, kind="dit", variables={"params": params}, spec=spec, class_names=dataset.class_names,
        source={"trained_by": "prism_jax diffusion stage", "ema": weights == "ema", "weights": weights},
        extra={"fingerprint": fingerprint, "history": history, "space": dc.space,
               **({} if vae_info is None else {"vae": _vae_record(vae_info)}),
               "timing_last_run": (previous_timing if previous_timing and not timing["steps_run"] else
                                   {**timing, "wall_seconds": time.perf_counter() - start})})
  print(f"[diffusion] eval loss {history[0]['loss']:.4f} (step {history[0]['step']}) -> {final['loss']:.4f} "
        f"(EMA {final['ema_loss']:.4f}); kept the {weights} weights (config.diffusion.weights={dc.weights!r}) -> "
        f"{final_dir}, {os.path.join(out_dir, SAMPLES_FILE)}", flush=True)
  return {"model_dir": final_dir, "weights": weights, **final}
