"""Aggregation of several teachers' logits on one batch into a single soft label (SPEC 5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prism_jax import errors

AGGREGATIONS = ("norm_rescaled_mean", "mean", "single")


def aggregate_logits(logits: jax.Array, method: str) -> jax.Array:
  """(K, B, C) logits of K teachers on the same batch -> (B, C) float32 soft-label logits.

  norm_rescaled_mean: official PRISM (`Brian-Moser/prism` relabel/generate_soft_label_r18.py
    L261-L264): each teacher's B x C matrix is rescaled to the mean Frobenius norm over teachers,
    Z_k / ||Z_k||_F * mean_j ||Z_j||_F, then averaged over k. As there, no epsilon: an all-zero
    teacher matrix gives NaN. Teachers with larger logits thus do not dominate the average.
  mean: plain mean over teachers (G-VBSM / EDC).
  single: the first teacher's logits, whatever K is (configs pair it with one teacher).
  """
  if method not in AGGREGATIONS:
    raise errors.ConfigError(f"relabel.aggregation={method!r}: expected one of {AGGREGATIONS}")
  logits = jnp.asarray(logits)
  if logits.ndim != 3 or logits.shape[0] < 1:
    raise ValueError(f"teacher logits of shape {logits.shape}: expected (teachers >= 1, batch, classes)")
  logits = logits.astype(jnp.float32)
  if method == "single":
    return logits[0]
  if method == "mean":
    return jnp.mean(logits, axis=0)
  norms = jnp.sqrt(jnp.sum(jnp.square(logits), axis=(1, 2), keepdims=True))
  return jnp.mean(logits / norms * jnp.mean(norms, axis=0, keepdims=True), axis=0)
