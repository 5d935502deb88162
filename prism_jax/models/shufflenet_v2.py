"""ShuffleNetV2 x0.5 / x1.0 in the torchvision layout (channel shuffle with 2 groups, NHWC).

`stem='small'`: the 3x3 stem conv has stride 1 and the max-pool is dropped (32 px -> 4x4 at the
end). Width scales every stage's channels to a multiple of 4 (at least 8), so both branches keep
an integer, equal number of channels.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from prism_jax.models import layers

STAGE_REPEATS = (4, 8, 4)
STAGE_OUT_CHANNELS = {
    "shufflenet_v2_x0_5": (24, 48, 96, 192, 1024),
    "shufflenet_v2_x1_0": (24, 116, 232, 464, 1024),
}


def stage_channels(arch: str, width: float) -> tuple[int, ...]:
  if width == 1.0:
    return STAGE_OUT_CHANNELS[arch]
  return tuple(max(8, layers.make_divisible(c * width, 4)) for c in STAGE_OUT_CHANNELS[arch])


def channel_shuffle(x: jax.Array, groups: int = 2) -> jax.Array:
  """torch's view(b, g, c/g, h, w).transpose(1, 2) expressed on NHWC."""
  b, h, w, c = x.shape
  return x.reshape(b, h, w, groups, c // groups).transpose(0, 1, 2, 4, 3).reshape(b, h, w, c)


class ShuffleUnit(nn.Module):
  """torchvision's InvertedResidual; stride 2 has two branches, stride 1 splits the channels."""
  out_channels: int
  stride: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    branch = self.out_channels // 2
    if self.stride == 1:
      passthrough, x2 = jnp.split(x, 2, axis=-1)
    else:
      # branch1 runs first, as in torch, so the BN forward order matches.
      passthrough = layers.ConvBN(x.shape[-1], 3, self.stride, groups=x.shape[-1], dtype=self.dtype,
                                  name="branch1_depthwise")(x, train)
      passthrough = layers.ConvBN(branch, 1, activation=nn.relu, dtype=self.dtype,
                                  name="branch1_pointwise")(passthrough, train)
      x2 = x
    out = layers.ConvBN(branch, 1, activation=nn.relu, dtype=self.dtype,
                        name="branch2_pointwise1")(x2, train)
    out = layers.ConvBN(branch, 3, self.stride, groups=branch, dtype=self.dtype,
                        name="branch2_depthwise")(out, train)
    out = layers.ConvBN(branch, 1, activation=nn.relu, dtype=self.dtype,
                        name="branch2_pointwise2")(out, train)
    return channel_shuffle(jnp.concatenate([passthrough, out], axis=-1), 2)


class ShuffleNetV2(nn.Module):
  arch: str
  num_classes: int
  stem: str = "imagenet"
  width: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    layers.check_stem(self.stem)
    channels = stage_channels(self.arch, self.width)
    x = x.astype(self.dtype)
    stem_stride = 2 if self.stem == "imagenet" else 1
    x = layers.ConvBN(channels[0], 3, stem_stride, activation=nn.relu, dtype=self.dtype,
                      name="conv1")(x, train)
    if self.stem == "imagenet":
      x = layers.max_pool(x, 3, 2, padding=1)
    for stage, repeats in enumerate(STAGE_REPEATS):
      for index in range(repeats):
        x = ShuffleUnit(channels[stage + 1], 2 if index == 0 else 1, dtype=self.dtype,
                        name=f"stage{stage + 2}_{index}")(x, train)
    x = layers.ConvBN(channels[-1], 1, activation=nn.relu, dtype=self.dtype, name="conv5")(x, train)
    features = layers.global_avg_pool(x).astype(jnp.float32)
    logits = layers.classifier(self.num_classes, self.dtype, name="fc")(features)
    return (logits, features) if return_features else logits
