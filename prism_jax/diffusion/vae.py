"""Stable Diffusion's AutoencoderKL (sd-vae-ft-ema / sd-vae-ft-mse) in Flax Linen, NHWC.

The layout follows diffusers' `AutoencoderKL` module for module, so that `vae_import` maps its
state_dict one tensor to one variable:
  encoder: conv_in -> down blocks (ResNet blocks, a stride-2 downsampler after all but the last) ->
           mid block (resnet, single-head self-attention, resnet) -> GroupNorm, SiLU, conv_out
           (2 * latent_channels: mean and log-variance) ; then quant_conv (1x1)
  decoder: post_quant_conv (1x1) ; then conv_in -> mid block -> up blocks (layers_per_block + 1
           ResNet blocks, nearest 2x upsampling + conv after all but the last) -> GroupNorm, SiLU,
           conv_out
Choices that matter for parity with the reference:
  - GroupNorm eps is 1e-6 everywhere and uses the two-pass variance (flax's default fast variance
    E[x^2] - E[x]^2 loses digits on the large activations of the decoder).
  - the downsampler pads (0, 1) on the bottom/right only, then a VALID stride-2 3x3 conv.
  - attention logits and softmax run in float32 whatever the compute dtype (the reference upcasts).
  - log-variance is clipped to [-30, 20] as the reference's DiagonalGaussianDistribution.
Images are in [-1, 1]; any resolution divisible by 2 ** (len(block_out_channels) - 1) works.
`encode_to_latents` / `decode_latents` apply the scaling factor that diffusion models see.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

GROUP_NORM_EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)

SPECS = {
    # Stable Diffusion's VAE (and sd-vae-ft-ema / -mse): 8x down, 4 latent channels, 83.7M params.
    "sd": dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
               latent_channels=4, norm_num_groups=32, scaling_factor=0.18215),
    # A CPU-sized model of the same layout (2x down) for tests and toy runs.
    "tiny": dict(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                 latent_channels=4, norm_num_groups=8, scaling_factor=0.18215),
}
SPEC_FIELDS = tuple(SPECS["sd"])  # a spec is exactly these constructor fields (dtype is passed apart)


def _group_norm(num_groups: int, dtype: Any, name: str) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=num_groups, epsilon=GROUP_NORM_EPS, use_fast_variance=False,
                      dtype=dtype, name=name)


def _conv3x3(features: int, dtype: Any, name: str) -> nn.Conv:
  return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), dtype=dtype, name=name)


class ResnetBlock(nn.Module):
  """GroupNorm, SiLU, conv3x3, GroupNorm, SiLU, conv3x3, plus the input (1x1 conv when widths differ)."""
  out_channels: int
  norm_num_groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.silu(_group_norm(self.norm_num_groups, self.dtype, "norm1")(x))
    h = _conv3x3(self.out_channels, self.dtype, "conv1")(h)
    h = nn.silu(_group_norm(self.norm_num_groups, self.dtype, "norm2")(h))
    h = _conv3x3(self.out_channels, self.dtype, "conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = nn.Conv(self.out_channels, (1, 1), dtype=self.dtype, name="conv_shortcut")(x)
    return x + h


class SpatialSelfAttention(nn.Module):
  """Single-head self-attention over the H*W positions, with a pre-GroupNorm and a residual."""
  norm_num_groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    batch, height, width, channels = x.shape
    h = _group_norm(self.norm_num_groups, self.dtype, "group_norm")(x)
    h = h.reshape(batch, height * width, channels)
    query = nn.Dense(channels, dtype=self.dtype, name="to_q")(h)
    key = nn.Dense(channels, dtype=self.dtype, name="to_k")(h)
    value = nn.Dense(channels, dtype=self.dtype, name="to_v")(h)
    logits = jnp.einsum("bqc,bkc->bqk", query, key, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits / jnp.sqrt(jnp.float32(channels)), axis=-1)
    attended = jnp.einsum("bqk,bkc->bqc", weights.astype(value.dtype), value)
    out = nn.Dense(channels, dtype=self.dtype, name="to_out")(attended)
    return x + out.reshape(batch, height, width, channels)


class MidBlock(nn.Module):
  """resnet, attention, resnet at the lowest resolution (width unchanged)."""
  norm_num_groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    x = ResnetBlock(channels, self.norm_num_groups, self.dtype, name="resnets_0")(x)
    x = SpatialSelfAttention(self.norm_num_groups, self.dtype, name="attentions_0")(x)
    return ResnetBlock(channels, self.norm_num_groups, self.dtype, name="resnets_1")(x)


class Downsample(nn.Module):
  """Stride-2 3x3 conv after padding one row/column at the bottom/right (the reference's (0,1,0,1))."""
  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return nn.Conv(self.channels, (3, 3), strides=(2, 2), padding="VALID", dtype=self.dtype, name="conv")(x)


class Upsample(nn.Module):
  """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""
  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return _conv3x3(self.channels, self.dtype, "conv")(x)


class Encoder(nn.Module):
  """Images (B, H, W, in_channels) -> (B, H/f, W/f, 2 * latent_channels), f = 2 ** (blocks - 1)."""
  block_out_channels: Sequence[int]
  layers_per_block: int
  latent_channels: int
  norm_num_groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    groups, dtype = self.norm_num_groups, self.dtype
    h = _conv3x3(self.block_out_channels[0], dtype, "conv_in")(x.astype(dtype))
    last = len(self.block_out_channels) - 1
    for i, channels in enumerate(self.block_out_channels):
      block = f"down_blocks_{i}"
      for j in range(self.layers_per_block):
        h = ResnetBlock(channels, groups, dtype, name=f"{block}_resnets_{j}")(h)
      if i != last:
        h = Downsample(channels, dtype, name=f"{block}_downsampler")(h)
    h = MidBlock(groups, dtype, name="mid_block")(h)
    h = nn.silu(_group_norm(groups, dtype, "conv_norm_out")(h))
    return _conv3x3(2 * self.latent_channels, dtype, "conv_out")(h)


class Decoder(nn.Module):
  """Latents (B, h, w, latent_channels) -> images (B, h*f, w*f, out_channels)."""
  block_out_channels: Sequence[int]
  layers_per_block: int
  out_channels: int
  norm_num_groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z):
    groups, dtype = self.norm_num_groups, self.dtype
    h = _conv3x3(self.block_out_channels[-1], dtype, "conv_in")(z.astype(dtype))
    h = MidBlock(groups, dtype, name="mid_block")(h)
    widths = tuple(reversed(self.block_out_channels))
    last = len(widths) - 1
    for i, channels in enumerate(widths):
      block = f"up_blocks_{i}"
      for j in range(self.layers_per_block + 1):
        h = ResnetBlock(channels, groups, dtype, name=f"{block}_resnets_{j}")(h)
      if i != last:
        h = Upsample(channels, dtype, name=f"{block}_upsampler")(h)
    h = nn.silu(_group_norm(groups, dtype, "conv_norm_out")(h))
    return _conv3x3(self.out_channels, dtype, "conv_out")(h)


class AutoencoderKL(nn.Module):
  """The KL-regularized autoencoder of latent diffusion; `dtype` is the compute dtype (params float32)."""
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  dtype: Any = jnp.float32

  def setup(self):
    blocks = tuple(self.block_out_channels)
    self.encoder = Encoder(blocks, self.layers_per_block, self.latent_channels, self.norm_num_groups,
                           self.dtype)
    self.quant_conv = nn.Conv(2 * self.latent_channels, (1, 1), dtype=self.dtype)
    self.post_quant_conv = nn.Conv(self.latent_channels, (1, 1), dtype=self.dtype)
    self.decoder = Decoder(blocks, self.layers_per_block, self.out_channels, self.norm_num_groups,
                           self.dtype)

  @property
  def downsampling_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  def encode(self, x):
    """Images in [-1, 1] (B, H, W, in_channels) -> (mean, logvar) of the posterior, unscaled."""
    self._check_spatial(x)
    moments = self.quant_conv(self.encoder(x))
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, z):
    """Unscaled latents (B, h, w, latent_channels) -> images (roughly in [-1, 1], not clipped)."""
    return self.decoder(self.post_quant_conv(z.astype(self.dtype)))

  def __call__(self, x):
    mean, _ = self.encode(x)
    return self.decode(mean)

  def _check_spatial(self, x):
    factor = self.downsampling_factor
    if x.ndim != 4 or x.shape[-1] != self.in_channels or x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(f"images of shape {tuple(x.shape)}: expected (B, H, W, {self.in_channels}) with "
                       f"H and W divisible by {factor}")


def encode_to_latents(model: AutoencoderKL, variables: Mapping[str, Any], images: jax.Array,
                      key: jax.Array | None = None) -> jax.Array:
  """Images in [-1, 1] -> latents as a diffusion model sees them (times `scaling_factor`).

  Without `key` the posterior mean; with one a sample mean + std * eps, eps ~ N(0, 1) drawn from `key`.
  """
  mean, logvar = model.apply(variables, images, method=AutoencoderKL.encode)
  latents = mean
  if key is not None:
    noise = jax.random.normal(key, mean.shape, jnp.float32).astype(mean.dtype)
    latents = mean + jnp.exp(0.5 * logvar) * noise
  return latents * model.scaling_factor


def decode_latents(model: AutoencoderKL, variables: Mapping[str, Any], latents: jax.Array) -> jax.Array:
  """Scaled latents (as produced by `encode_to_latents`) -> images."""
  return model.apply(variables, latents / model.scaling_factor, method=AutoencoderKL.decode)


def vae_spec(name: str = "sd") -> dict[str, Any]:
  """The constructor keyword arguments of a named VAE ('sd': Stable Diffusion's; 'tiny': for tests)."""
  if name not in SPECS:
    raise ValueError(f"unknown VAE spec {name!r}; known: {', '.join(SPECS)}")
  return dict(SPECS[name])



def create_vae(spec: Mapping[str, Any], dtype: Any = jnp.float32) -> AutoencoderKL:
  """An AutoencoderKL from a spec (e.g. one read back from JSON, where tuples became lists)."""
  unknown = sorted(set(spec) - set(SPEC_FIELDS))
  if unknown:
    raise ValueError(f"VAE spec has unknown field(s) {unknown}; known: {', '.join(SPEC_FIELDS)}")
  kwargs = dict(spec)
  if "block_out_channels" in kwargs:
    kwargs["block_out_channels"] = tuple(int(c) for c in kwargs["block_out_channels"])
  for field in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups"):
    if field in kwargs:
      kwargs[field] = int(kwargs[field])
  if "scaling_factor" in kwargs:
    kwargs["scaling_factor"] = float(kwargs["scaling_factor"])
  groups = kwargs.get("norm_num_groups", AutoencoderKL.norm_num_groups)
  for channels in kwargs.get("block_out_channels", AutoencoderKL.block_out_channels):
    if channels % groups:
      raise ValueError(f"VAE spec: block width {channels} is not divisible by norm_num_groups={groups}")
  return AutoencoderKL(dtype=dtype, **kwargs)
