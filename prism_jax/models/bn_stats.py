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

from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax

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

  def capture(next_fun, args, kwargs, context):
    if isinstance(context.module, layers.BatchNorm) and context.method_name == "__call__":
      x = args[0] if args else kwargs["x"]
      mean, var = layers.batch_moments(x, tuple(range(x.ndim - 1)))
      bn = context.module
      records.append(BNStat(mean, var, bn.get_variable("batch_stats", "mean"),
                            bn.get_variable("batch_stats", "var")))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(capture):
    logits, features = model.apply(variables, images, train=False, return_features=True)
  return TeacherOutput(logits, features, tuple(records))

