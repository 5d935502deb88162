"""The PRISM recovery objective (SPEC 4.1) as pure functions of teacher outputs.

  L(X) = CE(phi(A(X)), y) + (r_bn / K) * sum_{teachers} sum_l w_l * (||mu_l - mu_hat_l|| + ||var_l - var_hat_l||)

with w_0 = first_bn_multiplier for each teacher's first BN layer and plain (not squared) L2 norms
over channels.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import optax


def safe_norm(x: jax.Array) -> jax.Array:
  """Euclidean norm whose gradient at 0 is 0 instead of NaN (a NaN input still gives NaN)."""
  sq = jnp.sum(jnp.square(x))
  zero = sq == 0
  return jnp.where(zero, 0.0, jnp.sqrt(jnp.where(zero, 1.0, sq)))


def bn_matching_loss(bn_stats: Sequence, first_bn_multiplier: float) -> jax.Array:
  """sum_l w_l (||batch_mean - running_mean|| + ||batch_var - running_var||); 0 for no BN layers."""
  total = jnp.zeros((), jnp.float32)
  for layer, stat in enumerate(bn_stats):
    weight = first_bn_multiplier if layer == 0 else 1.0
    total = total + weight * (safe_norm(stat.batch_mean - stat.running_mean) +
                              safe_norm(stat.batch_var - stat.running_var))
  return total


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean cross-entropy with hard labels (torch.nn.CrossEntropyLoss)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def total_variation(images: jax.Array) -> jax.Array:
  """Mean absolute + squared TV prior used by the SRe2L family (off by default)."""
  dx = images[:, :, 1:, :] - images[:, :, :-1, :]
  dy = images[:, 1:, :, :] - images[:, :-1, :, :]
  return jnp.mean(jnp.abs(dx)) + jnp.mean(jnp.abs(dy))
