"""Training step of a class-conditional diffusion model (DiT's recipe: AdamW 1e-4, EMA 0.9999,
label dropout 0.1 to the null class for classifier-free guidance).

Randomness is per example: example i of the global batch draws its timestep, noise and label drop
from fold_in(step_key, index[i]), where `index` holds global example indices, so a step gives the
same result whether the batch is processed whole or sharded over any number of devices.
The model is `apply_fn({'params': params}, x_t, t, y) -> (B, H, W, C or 2C)`; label dropout happens
here, not in the model.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import struct

from prism_jax.diffusion import schedule as diffusion_schedule
from prism_jax.diffusion.schedule import DiffusionSchedule
from prism_jax.train import optim

ApplyFn = Callable[..., jax.Array]


class DiffusionTrainState(struct.PyTreeNode):
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any


def create_train_state(params: Any, tx: optax.GradientTransformation) -> DiffusionTrainState:
  """Step 0, EMA = the initial parameters (DiT copies the model into the EMA before training)."""
  return DiffusionTrainState(step=jnp.zeros((), jnp.int32), params=params,
                             ema_params=jax.tree_util.tree_map(jnp.array, params),
                             opt_state=tx.init(params))


def make_optimizer(learning_rate: float | optax.Schedule = 1e-4, weight_decay: float = 0.0,
                   grad_clip: float | None = None) -> optax.GradientTransformation:
  """AdamW as DiT trains (lr 1e-4, β = (0.9, 0.999), ε = 1e-8, no decay, no clipping).

  The project's AdamW (`train.optim.make_optimizer`: decay, when set, on kernels only); grad_clip
  clips the global gradient norm before the update.
  """
  if grad_clip is not None and grad_clip <= 0:
    raise ValueError(f"grad_clip={grad_clip}: expected None or > 0")
  adamw = optim.make_optimizer("adamw", learning_rate, weight_decay=weight_decay, b1=0.9, b2=0.999)
  if grad_clip is None:
    return adamw
  return optax.chain(optax.clip_by_global_norm(grad_clip), adamw)


def training_inputs(key: jax.Array, index: jax.Array, labels: jax.Array, image_shape: tuple[int, ...], *,
                    num_timesteps: int, num_classes: int,
                    label_dropout: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-example random draws of one step: (t (B,), noise (B, *image_shape), model labels (B,)).

  t ~ U{0..T−1}; each label is replaced by the null class (index num_classes) with probability
  `label_dropout`. Example i uses only fold_in(key, index[i]).
  """
  def draw(example_index, label):
    example_key = jax.random.fold_in(key, example_index)
    t = jax.random.randint(jax.random.fold_in(example_key, 0), (), 0, num_timesteps, jnp.int32)
    noise = jax.random.normal(jax.random.fold_in(example_key, 1), image_shape, jnp.float32)
    dropped = jax.random.uniform(jax.random.fold_in(example_key, 2)) < label_dropout
    return t, noise, jnp.where(dropped, num_classes, label).astype(jnp.int32)
  return jax.vmap(draw)(index, labels)


def ema_update(ema_params: Any, params: Any, decay: float) -> Any:
  """ema ← decay·ema + (1 − decay)·params."""
  return jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def train_step(state: DiffusionTrainState, batch: Mapping[str, jax.Array], key: jax.Array, *,
               apply_fn: ApplyFn, schedule: DiffusionSchedule, tx: optax.GradientTransformation,
               num_classes: int, label_dropout: float = 0.1, ema_decay: float = 0.9999,
               learn_sigma_loss: bool = False) -> tuple[DiffusionTrainState, dict[str, jax.Array]]:
  """One AdamW step on the ε-MSE (+ the learned-variance VLB term when `learn_sigma_loss`), then EMA.

  batch: `images` (B, H, W, C) already normalized (pixels in [-1, 1]) or encoded (scaled latents),
  `labels` (B,) in 0..num_classes−1, `index` (B,) global example indices. `key` is this step's key
  (the caller folds in the step number). Jit with the keyword arguments bound by functools.partial.
  """
  images = batch["images"].astype(jnp.float32)
  in_channels = images.shape[-1]
  t, noise, model_labels = training_inputs(
      key, batch["index"], batch["labels"], images.shape[1:], num_timesteps=schedule.num_timesteps,
      num_classes=num_classes, label_dropout=label_dropout)
  x_t = diffusion_schedule.q_sample(schedule, images, t, noise)

  def loss_fn(params):
    model_out = apply_fn({"params": params}, x_t, t, model_labels).astype(jnp.float32)
    mse = jnp.mean(diffusion_schedule.epsilon_loss(model_out, noise, in_channels))
    terms = {"mse": mse}
    loss = mse
    if learn_sigma_loss:
      vlb = jnp.mean(diffusion_schedule.vlb_loss(schedule, model_out, images, x_t, t, in_channels))
      terms["vlb"] = vlb
      loss = loss + vlb
    return loss, terms

  (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params,
                            ema_params=ema_update(state.ema_params, params, ema_decay),
                            opt_state=opt_state)
  metrics = {"loss": loss, **terms, "grad_norm": optax.tree.norm(grads)}
  return new_state, metrics
