"""DAP's representativeness prior (SPEC 13; dap-paper.txt 3.3, A.3.2, A.3.3): DiT features, the
kernel-induced energy against real references of the class, and its gradient on the noisy input.

  φ(x, t, y)   mean over tokens of the DiT's tokens after block `feature_block` (label y)
  Φ            the features of M real class-y inputs noised to the same t (q(x_t | x_0), seeded)
  linear       E = ‖φ(x_t) − mean_j Φ_j‖²
  rbf(σ)       E = mean_j 2 (1 − exp(−‖φ(x_t) − Φ_j‖² / 2σ²)); σ ≤ 0 picks σ² = median_{i<j} ‖Φ_i − Φ_j‖² / 2
               of the references at that step (the median heuristic)
  guidance     ε̃ = ε_cfg + λ √(1 − ᾱ_t) ∇_{x_t} E  (the score moves by −λ ∇E; no x̂_0 decoding)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from prism_jax.diffusion import dit as dit_lib
from prism_jax.diffusion import schedule as schedule_lib

KERNELS = ("linear", "rbf")


def features(model: dit_lib.DiT, variables: Any, x: jax.Array, t: jax.Array, y: jax.Array,
             feature_block: int) -> jax.Array:
  """(B, D) mean-pooled tokens after the first `feature_block` blocks."""
  tokens = model.apply(variables, x, t, y, feature_block, method=dit_lib.DiT.tokens_after)
  return jnp.mean(tokens.astype(jnp.float32), axis=1)


def reference_features(model, variables, refs: jax.Array, t: jax.Array, noise: jax.Array, y: jax.Array,
                       schedule: schedule_lib.DiffusionSchedule, feature_block: int) -> jax.Array:
  """Φ (M, D) of M clean references (M, H, W, C) of one class noised to timestep t (a scalar)."""
  t_batch = jnp.full((refs.shape[0],), t, jnp.int32)
  x_t = schedule_lib.q_sample(schedule, refs, t_batch, noise)
  return features(model, variables, x_t, t_batch, jnp.full((refs.shape[0],), y, jnp.int32), feature_block)


def median_bandwidth(refs_features: jax.Array) -> jax.Array:
  """σ of the median heuristic: σ² = median of the pairwise squared distances of the references / 2."""
  d2 = jnp.sum((refs_features[:, None] - refs_features[None]) ** 2, axis=-1)
  m = refs_features.shape[0]
  upper = d2[jnp.triu_indices(m, k=1)]
  return jnp.sqrt(jnp.maximum(jnp.median(upper) / 2.0, 1e-12))


def energy(phi: jax.Array, refs_features: jax.Array, kernel: str, sigma: jax.Array | float = 0.0) -> jax.Array:
  """E of one sample's features phi (D,) against references (M, D)."""
  if kernel == "linear":
    return jnp.sum((phi - jnp.mean(refs_features, axis=0)) ** 2)
  if kernel == "rbf":
    d2 = jnp.sum((phi[None] - refs_features) ** 2, axis=-1)
    return jnp.mean(2.0 * (1.0 - jnp.exp(-d2 / (2.0 * sigma ** 2))))
  raise ValueError(f"kernel={kernel!r}: expected one of {KERNELS}")


def energy_and_grad(model, variables, x_t: jax.Array, t: jax.Array, y: jax.Array, refs_features: jax.Array,
                    sigma: jax.Array, *, kernel: str, feature_block: int) -> tuple[jax.Array, jax.Array]:
  """Per-example E (B,) and ∇_{x_t} E (B, H, W, C); refs_features (B, M, D) and sigma (B,) are each
  example's class references (an example's energy depends on its own input only)."""
  def total(x):
    phi = features(model, variables, x, t, y, feature_block)
    e = jax.vmap(lambda p, r, s: energy(p, r, kernel, s))(phi, refs_features, sigma)
    return jnp.sum(e), e
  grad, e = jax.grad(total, has_aux=True)(x_t)
  return e, grad


def guide_eps(eps: jax.Array, grad: jax.Array, alpha_bar: jax.Array, scale: jax.Array | float) -> jax.Array:
  """ε̃ = ε + λ √(1 − ᾱ_t) ∇E (alpha_bar (B,) or a scalar)."""
  return eps + scale * schedule_lib.per_example(jnp.sqrt(1.0 - alpha_bar), eps) * grad
