"""Pixel conversions, sample grids and the EMA sampler of the diffusion stage (library side)."""

from __future__ import annotations

import functools
import io

import jax
import jax.numpy as jnp
import numpy as np

from prism_jax.diffusion import sampling, training
from prism_jax.diffusion import schedule as schedule_lib
from prism_jax.parallel import mesh as mesh_lib


def normalize(images: jax.Array) -> jax.Array:
  """uint8 pixels -> [-1, 1]."""
  return images.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(x: np.ndarray) -> np.ndarray:
  return np.clip(np.round((np.asarray(x, np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def sample_grid(samples: np.ndarray, rows: int, cols: int) -> np.ndarray:
  """(rows * cols, H, W, C) uint8, row-major -> one (rows * H, cols * W, C) image."""
  _, h, w, c = samples.shape
  return samples[:rows * cols].reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def png_bytes(image: np.ndarray) -> bytes:
  from PIL import Image

  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


def identity(x: jax.Array) -> jax.Array:
  return x.astype(jnp.float32)


def eval_loss(params, images, labels, index, key, *, apply_fn, schedule, num_classes, prepare):
  x0 = prepare(images)
  t, noise, y = training.training_inputs(key, index, labels, x0.shape[1:], num_timesteps=schedule.num_timesteps,
                                         num_classes=num_classes, label_dropout=0.0)
  x_t = schedule_lib.q_sample(schedule, x0, t, noise)
  out = apply_fn({"params": params}, x_t, t, y).astype(jnp.float32)
  return jnp.mean(schedule_lib.epsilon_loss(out, noise, x0.shape[-1]))


def sample_ema(params, model, schedule, key: jax.Array, mesh, *, num_classes: int, samples_per_class: int,
               num_steps: int, cfg_scale: float) -> np.ndarray:
  """(samples_per_class * num_classes, H, W, C) DDIM samples in [-1, 1], row r = sample r of every class;
  sample i uses the key fold_in(key, i), so the result does not depend on the device count."""
  count = samples_per_class * num_classes
  num_devices = mesh.devices.size
  padded = -(-count // num_devices) * num_devices
  index = np.arange(padded, dtype=np.int32)
  labels = (index % num_classes).astype(np.int32)
  replicated, data = mesh_lib.replicated(mesh), mesh_lib.data_sharding(mesh)
  rows = mesh_lib.local_batch_slice(padded, mesh)

  labels = mesh_lib.put_global_batch(labels[rows], padded, mesh)
  index = mesh_lib.put_global_batch(index[rows], padded, mesh)
  if sampling.host_loop_by_default():  # CPU: one compiled step driven from the host (sampling.py)
    keys = jax.jit(jax.vmap(jax.random.fold_in, in_axes=(None, 0)), out_shardings=data)(key, index)
    out = sampling.sample_class_conditional_host(
        model.apply, {"params": params}, labels, keys, shape=(model.input_size, model.input_size, model.in_channels),
        num_classes=num_classes, schedule=schedule, num_steps=num_steps, cfg_scale=cfg_scale)
    out = jax.jit(lambda x: x, out_shardings=replicated)(out)
  else:
    out = _sampler(model, num_classes, num_steps, float(cfg_scale), replicated, data)(params, labels, index, key,
                                                                                     schedule)
  return np.asarray(out.addressable_shards[0].data)[:count]


@functools.lru_cache(maxsize=8)
def _sampler(model, num_classes: int, num_steps: int, cfg_scale: float, replicated, data):
  """One jitted sampler per model and setting (the periodic TensorBoard grids reuse it)."""

  def sample(p, labels, index, key, schedule):
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(index)
    return sampling.sample_class_conditional(
        model.apply, {"params": p}, labels, keys, shape=(model.input_size, model.input_size, model.in_channels),
        num_classes=num_classes, schedule=schedule, num_steps=num_steps, cfg_scale=cfg_scale)

  return jax.jit(sample, in_shardings=(replicated, data, data, replicated, replicated), out_shardings=replicated)
