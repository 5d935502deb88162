"""Optimizers and learning-rate schedules shared by teacher (squeeze) and student training."""

from __future__ import annotations

import jax
import optax

from prism_jax import errors


def decay_mask(params):
  """True for weights that get weight decay: conv and dense kernels, not BN scales/biases or biases."""
  return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def warmup_cosine(peak_lr: float, total_steps: int, warmup_steps: int = 0) -> optax.Schedule:
  """Linear warm-up from 0 to `peak_lr`, then cosine decay to 0 at `total_steps`."""
  if total_steps < 1:
    raise errors.ConfigError(f"total_steps must be >= 1, got {total_steps}")
  warmup_steps = min(warmup_steps, total_steps - 1)
  if warmup_steps <= 0:
    return optax.cosine_decay_schedule(peak_lr, decay_steps=total_steps)
  return optax.warmup_cosine_decay_schedule(0.0, peak_lr, warmup_steps=warmup_steps,
                                            decay_steps=total_steps, end_value=0.0)


def make_optimizer(name: str, schedule: optax.Schedule, *, weight_decay: float, momentum: float = 0.9,
                   nesterov: bool = False, b1: float = 0.9, b2: float = 0.999) -> optax.GradientTransformation:
  """`sgd` (PyTorch-style coupled decay added to the gradient) or `adamw` (decoupled decay).

  In both, decay is masked to kernels only (no decay on BatchNorm parameters and biases).
  """
  if name == "sgd":
    return optax.chain(optax.add_decayed_weights(weight_decay, mask=decay_mask),
                       optax.sgd(schedule, momentum=momentum or None, nesterov=nesterov))
  if name == "adamw":
    return optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask)
  raise errors.ConfigError(f"optimizer={name!r}: expected 'sgd' or 'adamw'")
