"""Aggregation of several teachers' logits on one batch into a single soft label (SPEC 5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prism_jax import errors

AGGREGATIONS = ("norm_rescaled_mean", "primary_weighted", "mean", "single")


def aggregate_logits(logits: jax.Array, method: str) -> jax.Array:
  """(K, B, C) logits of K teachers on the same batch -> (B, C) float32 soft-label logits.

  norm_rescaled_mean: official PRISM (`Brian-Moser/prism` relabel/generate_soft_label_r18.py
    L261-L264): each teacher's B x C matrix is rescaled to the mean Frobenius norm over teachers,
    Z_k / ||Z_k||_F * mean_j ||Z_j||_F, then averaged over k. As there, no epsilon: an all-zero
    teacher matrix gives NaN. Teachers with larger logits thus do not dominate the average.
  primary_weighted: the official code's recipe for ResNet-50/101 students
    (relabel/generate_soft_label_r50.py and _r101.py of the official repository): the first teacher
    weighted 0.5 and the K - 1 others 0.5 / (K - 1) each, then each row (sample) rescaled to the
    batch's mean row L2 norm, z_i / ||z_i|| * mean_j ||z_j||.
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
  if method == "primary_weighted":
    k = logits.shape[0]
    weights = jnp.asarray([1.0] if k == 1 else [0.5] + [0.5 / (k - 1)] * (k - 1), jnp.float32)
    mixed = jnp.tensordot(weights, logits, axes=1)
    rows = jnp.sqrt(jnp.sum(jnp.square(mixed), axis=-1, keepdims=True))
    return mixed / rows * jnp.mean(rows, axis=0, keepdims=True)
  norms = jnp.sqrt(jnp.sum(jnp.square(logits), axis=(1, 2), keepdims=True))
  return jnp.mean(logits / norms * jnp.mean(norms, axis=0, keepdims=True), axis=0)
