"""Learning-rate schedules for student training (SPEC 6), stepped per epoch like the references.

The references wrap a factor f(e) in a per-epoch `LambdaLR`, so the learning rate is constant within
an epoch: here the epoch of an optimizer step is e = step // steps_per_epoch and lr = base_lr * f(e),
times an optional linear warm-up.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prism_jax import errors

SCHEDULES = ("constant", "cosine", "smoothed_cosine", "prism_cos2")
# The stretch zeta each schedule uses when none is given: EDC scripts use 2 (`--st 2`), PRISM
# hard-codes 2.5 in validate/train_FKD_parallel.py.
DEFAULT_ZETA = {"smoothed_cosine": 2.0, "prism_cos2": 2.5}


def _check_name(name: str) -> None:
  if name not in SCHEDULES:
    raise errors.ConfigError(f"train.schedule={name!r}: expected one of {SCHEDULES}")


def resolve_zeta(name: str, zeta: float | None) -> float:
  """The zeta `name` uses: `zeta` if given (must be > 0), else the schedule's default (1 if unused)."""
  _check_name(name)
  if zeta is None:
    return DEFAULT_ZETA.get(name, 1.0)
  if not zeta > 0:
    raise errors.ConfigError(f"train.zeta={zeta!r}: expected a positive number (or none for the default)")
  return float(zeta)


def lr_factor(name: str, epoch, total_epochs: int, zeta: float | None = None):
  """Multiplier f(e) of the base learning rate at epoch `epoch` out of `total_epochs` (E).

  constant: 1.  cosine: 1/2 (1 + cos(pi e / E)) (SRe2L `--cos`).
  smoothed_cosine: 1/2 (1 + cos(pi e / (zeta E))) (EDC scheduler trick).
  prism_cos2: an exact replica of the official PRISM LambdaLR, `Brian-Moser/prism`
  validate/train_FKD_parallel.py L286-L291:
    f(e) = 1/2 (1 + cos(pi e / (2.5 E)))                        if e <= E * 5 / 6  (float division)
         = 1/2 (1 + cos(pi 5 / (6 * 2.5))) * (6E - 6e) / (6E)   otherwise,
  with 2.5 replaced by zeta. The switch is inclusive, so with E = 300 epoch 250 still gets the cosine
  value 0.75 and epoch 251 drops to 0.75 * 49 / 300 = 0.1225. E is `--epochs`, and training epoch e
  (0-based, `range(start_epoch, epochs)` L302) runs with f(e): LambdaLR evaluates f(0) when built and
  `scheduler.step()` is called after each epoch (L317). The Python-number path evaluates these
  expressions in the same order as the official lambda.

  `epoch` is a Python number or a (possibly traced) jnp array; arrays give a float32 array.
  """
  _check_name(name)
  zeta = resolve_zeta(name, zeta)
  if total_epochs < 1:
    raise errors.ConfigError(f"train.epochs={total_epochs!r}: expected at least 1 epoch")
  if isinstance(epoch, (jax.Array, np.ndarray)):
    e = jnp.asarray(epoch).astype(jnp.float32)
    ones = jnp.ones_like(e)
    if name == "constant":
      return ones
    if name == "cosine":
      return 0.5 * (1.0 + jnp.cos(math.pi * e / total_epochs))
    smooth = 0.5 * (1.0 + jnp.cos(math.pi * e / (zeta * total_epochs)))
    if name == "smoothed_cosine":
      return smooth
    tail = 0.5 * (1.0 + math.cos(math.pi * 5 / (6 * zeta))) * (6 * total_epochs - 6 * e) / (6 * total_epochs)
    return jnp.where(e <= total_epochs * 5 / 6, smooth, tail)
  if name == "constant":
    return 1.0
  if name == "cosine":
    return 0.5 * (1.0 + math.cos(math.pi * epoch / total_epochs))
  if name == "smoothed_cosine" or epoch <= total_epochs * 5 / 6:
    return 0.5 * (1.0 + math.cos(math.pi * epoch / (zeta * total_epochs)))
  drop = 0.5 * (1.0 + math.cos(math.pi * 5 / (6 * zeta)))
  return drop * (6 * total_epochs - 6 * epoch) / (6 * total_epochs)


def make_schedule(name: str, base_lr: float, total_epochs: int, steps_per_epoch: int,
                  zeta: float | None = None, warmup_epochs: float = 0.0) -> optax.Schedule:
  """Jittable step -> learning rate: base_lr * f(step // steps_per_epoch) * warm-up(step).

  The warm-up factor rises linearly from 0 at step 0 to 1 at round(warmup_epochs * steps_per_epoch)
  steps (the convention of `optim.warmup_cosine`); 0 warm-up epochs (the references) disables it.
  The epoch is clipped to E so that a step past the end never gives a negative rate
  (prism_cos2 reaches 0 at e = E); training steps (e < E) are unaffected.
  """
  zeta = resolve_zeta(name, zeta)
  lr_factor(name, 0, total_epochs, zeta)  # validates name and total_epochs up front
  if steps_per_epoch < 1:
    raise ValueError(f"steps_per_epoch={steps_per_epoch!r}: expected at least 1 optimizer step per epoch")
  if not warmup_epochs >= 0:
    raise errors.ConfigError(f"train.warmup_epochs={warmup_epochs!r}: expected a number >= 0")
  warmup_steps = int(round(warmup_epochs * steps_per_epoch))

  def schedule(step):
    step = jnp.asarray(step)
    epoch = jnp.minimum(step // steps_per_epoch, total_epochs)
    lr = base_lr * lr_factor(name, epoch, total_epochs, zeta)
    if warmup_steps > 0:
      lr = lr * jnp.minimum(step.astype(jnp.float32) / warmup_steps, 1.0)
    return lr

  return schedule
