"""The recovery program: a wave of stacked recovery batches optimized together (SPEC 4.3, 4.5).

A wave holds W units (recovery batches) stacked on a leading axis that is sharded over the mesh's
data axis; teacher variables are replicated. Each unit is optimized independently (its own BN
batch statistics, augmentation draws, learning-rate schedule and Adam state), so a step needs no
cross-device communication and results do not depend on how units are laid out on devices.

Memory: the gradient of the sum over teachers is accumulated one teacher at a time with the
augmented batch threaded through `optimization_barrier`, so teacher k+1's forward cannot start
before teacher k's backward is done and only one teacher's activations are live at a time; the
augmentation's pullback is applied once to the summed gradient.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from prism_jax.data import augment as aug
from prism_jax.models import bn_stats
from prism_jax.recover import objective


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static settings of a compiled wave program (hashable: used as a jit static argument)."""
  teacher_names: tuple[str, ...]     # evaluation order; the logit teacher first
  image_size: int
  low: tuple[float, float, float]    # per-channel clip bounds in normalized space
  high: tuple[float, float, float]
  learning_rate: float
  first_bn_multiplier: float
  jitter: int
  rrc_scale: tuple[float, float] = (0.08, 1.0)
  flip: bool = True
  adam_b1: float = 0.5
  adam_b2: float = 0.9
  adam_eps: float = 1e-8
  tv_weight: float = 0.0
  l2_weight: float = 0.0
  sequential_teachers: bool = True   # optimization_barrier between teachers (memory bound)




def init_state(images: jax.Array) -> dict[str, jax.Array]:
  """Optimizer state for a wave of images shaped (W, C, H, W, 3)."""
  zeros = jnp.zeros_like(images)
  num_units = images.shape[0]
  return {"images": images, "adam_m": zeros, "adam_v": zeros,
          "last_ce": jnp.zeros((num_units,), jnp.float32),
          "last_bn": jnp.zeros((num_units,), jnp.float32),
          "nonfinite_at": jnp.full((num_units,), -1, jnp.int32)}


def unit_loss_grad(images, labels, aug_key, ce_weights, bn_weights, teachers, cfg: StepConfig):
  """Gradient w.r.t. the images of one unit, plus its CE and BN losses at this iteration.

  ce_weights[k] is 1 for the logit teacher (0 otherwise); bn_weights[k] = r_bn / K for the BN
  teachers drawn (0 otherwise). `teachers` is a tuple of (model, variables) in cfg order.
  """
  params = aug.sample_recover_aug_params(aug_key, (cfg.image_size, cfg.image_size), cfg.jitter,
                                         scale=cfg.rrc_scale, flip=cfg.flip)
  augmented, pullback = jax.vjp(lambda x: aug.apply_recover_aug(x, params), images)
  grad = jnp.zeros_like(augmented)
  ce_total = jnp.zeros((), jnp.float32)
  bn_total = jnp.zeros((), jnp.float32)
  for k, (model, variables) in enumerate(teachers):
    def loss_fn(x, model=model, variables=variables, k=k):
      out = bn_stats.forward_with_bn_stats(model, variables, x)
      ce = objective.cross_entropy(out.logits, labels)
      bn = objective.bn_matching_loss(out.bn, cfg.first_bn_multiplier)
      return ce_weights[k] * ce + bn_weights[k] * bn, (ce_weights[k] * ce, bn_weights[k] * bn)
    (_, (ce, bn)), g = jax.value_and_grad(loss_fn, has_aux=True)(augmented)
    grad = grad + g
    ce_total, bn_total = ce_total + ce, bn_total + bn
    if cfg.sequential_teachers and k + 1 < len(teachers):
      augmented, grad = jax.lax.optimization_barrier((augmented, grad))
  (image_grad,) = pullback(grad)
  prior = jnp.zeros((), jnp.float32)
  if cfg.tv_weight or cfg.l2_weight:
    def prior_fn(x):
      return cfg.tv_weight * objective.total_variation(x) + cfg.l2_weight * jnp.sqrt(jnp.sum(x * x))
    prior, prior_grad = jax.value_and_grad(prior_fn)(images)
    image_grad = image_grad + prior_grad
  return image_grad, ce_total, bn_total + prior


def adam_update(images, m, v, grad, t, total, cfg: StepConfig):
  """torch.optim.Adam step with lr_t = lr0 * 0.5 * (1 + cos(pi t / T)), then clip."""
  lr = cfg.learning_rate * 0.5 * (1.0 + jnp.cos(jnp.pi * t / total))
  m = cfg.adam_b1 * m + (1.0 - cfg.adam_b1) * grad
  v = cfg.adam_b2 * v + (1.0 - cfg.adam_b2) * jnp.square(grad)
  step = (t + 1).astype(jnp.float32)
  m_hat = m / (1.0 - cfg.adam_b1 ** step)
  denom = jnp.sqrt(v) / jnp.sqrt(1.0 - cfg.adam_b2 ** step) + cfg.adam_eps
  images = images - lr * m_hat / denom
  low = jnp.asarray(cfg.low, jnp.float32)
  high = jnp.asarray(cfg.high, jnp.float32)
  return jnp.clip(images, low, high), m, v


def run_iterations(state, unit_keys, labels, totals, ce_weights, bn_weights, teacher_variables,
                   start, stop, *, models: tuple, cfg: StepConfig):
  """Runs iterations [start, stop) for every unit of a wave.

  Shapes (W = units in the wave): state arrays (W, C, H, W, 3) / (W,); unit_keys (W,) keys;
  labels (W, C); totals (W,) iteration counts T_u (0 for padding units); ce_weights, bn_weights
  (W, T_max, n_teachers) per-iteration teacher weights. A unit with t >= T_u is left unchanged.
  """
  teachers = tuple(zip(models, teacher_variables))

  def one_unit(images, m, v, last_ce, last_bn, bad_at, key, unit_labels, total, ce_w, bn_w, t):
    grad, ce, bn = unit_loss_grad(images, unit_labels, jax.random.fold_in(key, t), ce_w[t], bn_w[t],
                                  teachers, cfg)
    new_images, new_m, new_v = adam_update(images, m, v, grad, t, jnp.maximum(total, 1), cfg)
    active = t < total
    finite = jnp.isfinite(ce) & jnp.isfinite(bn) & jnp.all(jnp.isfinite(grad))
    bad_at = jnp.where(active & ~finite & (bad_at < 0), t, bad_at)
    keep = active & finite
    pick = lambda new, old: jnp.where(keep, new, old)
    return (pick(new_images, images), pick(new_m, m), pick(new_v, v),
            pick(ce, last_ce), pick(bn, last_bn), bad_at)

  def body(t, st):
    out = jax.vmap(one_unit, in_axes=(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, None))(
        st["images"], st["adam_m"], st["adam_v"], st["last_ce"], st["last_bn"], st["nonfinite_at"],
        unit_keys, labels, totals, ce_weights, bn_weights, t)
    return dict(zip(("images", "adam_m", "adam_v", "last_ce", "last_bn", "nonfinite_at"), out))

  return jax.lax.fori_loop(start, stop, body, state)
