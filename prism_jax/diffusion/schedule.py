"""The Gaussian diffusion process of DiT: linear β schedule, q(x_t | x_0) and the training losses.

Timesteps are integers 0..T-1 (t = 0 is one noising step, as in DiT and diffusers). Schedule
quantities are derived in float64 on the host and stored as float32 device arrays, as the official
code does. Images are NHWC; per-example losses average over every non-batch axis (DiT's
`mean_flat`), callers take the mean over the batch.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4,
                 beta_end: float = 0.02) -> np.ndarray:
  """DiT's (and DDPM's) linear β schedule, float64 so that the products over 1000 steps stay exact."""
  if num_timesteps < 1:
    raise ValueError(f"num_timesteps={num_timesteps}: expected >= 1")
  if not 0.0 < beta_start <= beta_end < 1.0:
    raise ValueError(f"beta_start={beta_start}, beta_end={beta_end}: expected 0 < start <= end < 1")
  return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


@struct.dataclass
class DiffusionSchedule:
  """The per-timestep constants of a diffusion process (a frozen pytree: pass it to jitted code).

  betas[t] = β_t, alphas_cumprod[t] = ᾱ_t = Π_{s<=t}(1 − β_s), posterior_log_variance[t] = log β̃_t
  (the variance of q(x_{t-1} | x_t, x_0); at t = 0, where β̃ is 0, the value at t = 1, as DiT clips it),
  and the posterior mean μ̃_t = posterior_mean_coef_x0[t]·x_0 + posterior_mean_coef_xt[t]·x_t (in
  float64 first: at t = 0 the float32 quotient β_0 / (1 − ᾱ_0) is off by 6e-4, 6% of the decoder's σ).
  """
  betas: jax.Array
  alphas_cumprod: jax.Array
  posterior_log_variance: jax.Array
  posterior_mean_coef_x0: jax.Array
  posterior_mean_coef_xt: jax.Array

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]

  @classmethod
  def from_betas(cls, betas: np.ndarray) -> "DiffusionSchedule":
    betas = np.asarray(betas, np.float64)
    if betas.ndim != 1 or betas.size < 2 or not ((betas > 0) & (betas < 1)).all():
      raise ValueError(f"betas: expected a 1-D array of >= 2 values in (0, 1), got shape {betas.shape}")
    alphas_cumprod = np.cumprod(1.0 - betas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    posterior_log_variance = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
    coef_x0 = betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    coef_xt = (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod)
    as_f32 = lambda values: jnp.asarray(values, jnp.float32)
    return cls(betas=as_f32(betas), alphas_cumprod=as_f32(alphas_cumprod),
               posterior_log_variance=as_f32(posterior_log_variance),
               posterior_mean_coef_x0=as_f32(coef_x0), posterior_mean_coef_xt=as_f32(coef_xt))

  @classmethod
  def linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4,
             beta_end: float = 0.02) -> "DiffusionSchedule":
    return cls.from_betas(linear_betas(num_timesteps, beta_start, beta_end))

  @classmethod
  def from_config(cls, config: Any) -> "DiffusionSchedule":
    """From a config (ConfigDict or mapping) with optional fields `beta_schedule` ('linear'),
    `num_timesteps`, `beta_start`, `beta_end`; missing fields take DiT's values."""
    get = config.get if hasattr(config, "get") else lambda name, default: getattr(config, name, default)
    kind = get("beta_schedule", "linear")
    if kind != "linear":
      raise ValueError(f"diffusion.beta_schedule={kind!r}: expected 'linear'")
    return cls.linear(int(get("num_timesteps", 1000)), float(get("beta_start", 1e-4)),
                      float(get("beta_end", 0.02)))


def per_example(values: jax.Array, like: jax.Array) -> jax.Array:
  """(B,) or scalar values shaped to broadcast against a (B, ...) array."""
  values = jnp.asarray(values)
  return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


def q_sample(schedule: DiffusionSchedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε, for integer timesteps t (B,) or scalar."""
  alpha_bar = per_example(schedule.alphas_cumprod[t], x0)
  return jnp.sqrt(alpha_bar) * x0 + jnp.sqrt(1.0 - alpha_bar) * noise


def split_model_output(model_out: jax.Array, in_channels: int) -> tuple[jax.Array, jax.Array | None]:
  """(ε, v): the first `in_channels` channels and, when the model learns σ, the next `in_channels`."""
  channels = model_out.shape[-1]
  if channels not in (in_channels, 2 * in_channels):
    raise ValueError(f"model output has {channels} channels: expected in_channels={in_channels} "
                     f"(ε only) or {2 * in_channels} (ε and the variance interpolation)")
  if channels == in_channels:
    return model_out, None
  return model_out[..., :in_channels], model_out[..., in_channels:]


def epsilon_loss(model_out: jax.Array, noise: jax.Array, in_channels: int) -> jax.Array:
  """Per-example ε-MSE (B,) over the ε channels of the model output (the v channels are ignored)."""
  eps, _ = split_model_output(model_out, in_channels)
  squared = jnp.square(eps.astype(jnp.float32) - noise.astype(jnp.float32))
  return jnp.mean(squared, axis=tuple(range(1, squared.ndim)))


def _normal_kl(mean1, log_var1, mean2, log_var2):
  return 0.5 * (-1.0 + log_var2 - log_var1 + jnp.exp(log_var1 - log_var2)
                + jnp.square(mean1 - mean2) * jnp.exp(-log_var2))


def _approx_standard_normal_cdf(x):
  # The tanh approximation of Φ used by DDPM/IDDPM/DiT for the discretized decoder likelihood.
  return 0.5 * (1.0 + jnp.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def _discretized_gaussian_log_likelihood(x0, mean, log_scale):
  """log P(x_0) per element under N(mean, exp(log_scale)²) binned to 256 levels of [-1, 1]."""
  centered = x0 - mean
  inv_std = jnp.exp(-log_scale)
  cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
  cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x0 < -0.999, log_cdf_plus, jnp.where(x0 > 0.999, log_one_minus_cdf_min, log_delta))


def vlb_loss(schedule: DiffusionSchedule, model_out: jax.Array, x0: jax.Array, x_t: jax.Array,
             t: jax.Array, in_channels: int) -> jax.Array:
  """The learned-variance term of DiT's loss (IDDPM's L_vlb), per example (B,), in bits per dim.

  The model's log-variance interpolates log β_t (v = 1) and log β̃_t (v = −1). The mean comes from ε
  under stop-gradient, so this term trains only v. KL(q(x_{t-1}|x_t,x_0) ‖ p(x_{t-1}|x_t)) for t > 0;
  the discretized decoder NLL of x_0 at t = 0 (which assumes data in [-1, 1], as the official code).
  """
  eps, v = split_model_output(model_out, in_channels)
  if v is None:
    raise ValueError(f"vlb_loss needs the variance channels: model output has {in_channels} channels, "
                     f"expected {2 * in_channels}")
  eps = jax.lax.stop_gradient(eps.astype(jnp.float32))
  v = v.astype(jnp.float32)
  alpha_bar = per_example(schedule.alphas_cumprod[t], x_t)
  min_log = per_example(schedule.posterior_log_variance[t], x_t)
  max_log = jnp.log(per_example(schedule.betas[t], x_t))
  coef_x0 = per_example(schedule.posterior_mean_coef_x0[t], x_t)
  coef_xt = per_example(schedule.posterior_mean_coef_xt[t], x_t)
  posterior_mean = lambda x0_value: coef_x0 * x0_value + coef_xt * x_t

  x0_pred = (x_t - jnp.sqrt(1.0 - alpha_bar) * eps) / jnp.sqrt(alpha_bar)
  model_mean = posterior_mean(x0_pred)
  fraction = (v + 1.0) / 2.0
  model_log_var = fraction * max_log + (1.0 - fraction) * min_log

  axes = tuple(range(1, x_t.ndim))
  kl = _normal_kl(posterior_mean(x0), min_log, model_mean, model_log_var)
  kl = jnp.mean(kl, axis=axes) / np.log(2.0)
  decoder_nll = -_discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)
  decoder_nll = jnp.mean(decoder_nll, axis=axes) / np.log(2.0)
  return jnp.where(t == 0, decoder_nll, kl)
