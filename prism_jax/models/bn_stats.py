"""BatchNorm statistics contract (SPEC 2.2): what recover's BN-matching loss needs from a teacher.

`forward_with_bn_stats` runs the teacher in eval mode (running stats normalize) and records, for
every `layers.BatchNorm` call in forward order, the mean and biased variance of that layer's
*input* over N, H, W (float32, two-pass) together with the layer's running mean/var.

Forward order comes from `nn.intercept_methods`: the interceptor fires on each BN call while the
forward pass is traced, so the Python list is appended in execution order. Nothing goes through a
variable collection, so dict key sorting can never reorder layers. The function is pure in its
array arguments: differentiable w.r.t. `images`, and usable under `jax.jit` and `jax.vmap` (vmap
over stacked recovery batches gives each batch its own statistics).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from prism_jax.models import layers


class BNStat(NamedTuple):
  batch_mean: jax.Array    # (C,) mean of the BN input over N, H, W
  batch_var: jax.Array     # (C,) biased variance of the BN input over N, H, W
  running_mean: jax.Array  # (C,) the layer's running mean
  running_var: jax.Array   # (C,) the layer's running variance


class TeacherOutput(NamedTuple):
  logits: jax.Array
  features: jax.Array      # pooled penultimate features (B, D)
  bn: tuple[BNStat, ...]   # one per BatchNorm layer, forward order; () for models without BN


def forward_with_bn_stats(model: nn.Module, variables: Mapping[str, Any],
                          images: jax.Array) -> TeacherOutput:
  """Eval-mode forward pass of `model` on one batch, with per-BN-layer input statistics."""
  records: list[BNStat] = []

  def record(x, running_mean, running_var):
    mean, var = layers.batch_moments(x, tuple(range(x.ndim - 1)))
    records.append(BNStat(mean, var, running_mean, running_var))

  with nn.intercept_methods(_on_bn_inputs(record)):
    logits, features = model.apply(variables, images, train=False, return_features=True)
  return TeacherOutput(logits, features, tuple(records))


def _on_bn_inputs(record):
  """An interceptor calling record(x, running_mean, running_var) on every `layers.BatchNorm`
  call, in forward order, before the layer runs."""
  def capture(next_fun, args, kwargs, context):
    if isinstance(context.module, layers.BatchNorm) and context.method_name == "__call__":
      bn = context.module
      record(args[0] if args else kwargs["x"], bn.get_variable("batch_stats", "mean"),
             bn.get_variable("batch_stats", "var"))
    return next_fun(*args, **kwargs)
  return capture


class BNMoments(NamedTuple):
  """Per BN layer, a batch part's share of the input moments over N, H, W of the whole batch.

  `mean_part` = sum(x) / count and `sq_part` = sum((x - center)^2) / count, where count is the
  element count per channel of the *whole* batch, so the parts of a split batch add up.
  """
  mean_part: jax.Array
  sq_part: jax.Array
  running_mean: jax.Array
  running_var: jax.Array


def forward_with_bn_moments(model: nn.Module, variables: Mapping[str, Any], images: jax.Array,
                            total_rows: int, centers: Sequence[jax.Array] | None = None,
                            row_weights: jax.Array | None = None
                            ) -> tuple[jax.Array, tuple[BNMoments, ...]]:
  """Eval-mode forward of one part of a batch of `total_rows` images, with additive BN moments.

  `centers[l]` is the center of layer l's squared deviations (default: its running mean). With
  the running means as centers, summing the parts of all pieces of a batch gives the batch mean
  mu = sum(mean_part) and the biased variance var = sum(sq_part) - (mu - running_mean)^2; with
  the batch means as centers (held constant), the vjp of the parts w.r.t. one piece's images is
  that piece's exact share of the gradient of any loss of (mu, var). This lets recover split a
  recovery batch into pieces and still follow the whole-batch BN statistics exactly.
  `row_weights` (rows,) of 0/1 leaves padding rows out of the sums.
  """
  records: list[BNMoments] = []

  def record(x, running_mean, running_var):
    x = x.astype(jnp.float32)
    center = running_mean if centers is None else centers[len(records)]
    count = total_rows * math.prod(x.shape[1:-1])
    axes = tuple(range(x.ndim - 1))
    w = 1.0 if row_weights is None else row_weights.reshape((-1,) + (1,) * (x.ndim - 1))
    records.append(BNMoments(jnp.sum(w * x, axis=axes) / count,
                             jnp.sum(w * jnp.square(x - center), axis=axes) / count,
                             running_mean, running_var))

  with nn.intercept_methods(_on_bn_inputs(record)):
    logits = model.apply(variables, images, train=False)
  return logits, tuple(records)
