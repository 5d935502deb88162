"""MobileNetV2 in the torchvision layout (ReLU6, BN eps 1e-5, dropout 0.2 before the classifier).

`stem='small'` (32-64 px inputs): the first conv and the first stride-2 stage (24 channels) use
stride 1, so a 32 px input ends at 4x4 instead of 1x1 (the usual CIFAR variant).
Width: channels via torchvision's `_make_divisible(c * width, 8)`; unlike torchvision the last
1x1 conv (1280) is also scaled for width < 1, so narrow CPU teachers stay narrow.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from prism_jax.models import layers

# (expand ratio t, output channels c, repeats n, first stride s), torchvision's table.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
LAST_CHANNELS = 1280


def block_configs(width: float, stem: str) -> list[tuple[int, int, int, int]]:
  """(in_channels, out_channels, stride, expand_ratio) for features_1 .. features_17."""
  in_channels = layers.make_divisible(STEM_CHANNELS * width, 8)
  configs = []
  for stage, (t, c, n, s) in enumerate(INVERTED_RESIDUAL_SETTING):
    out_channels = layers.make_divisible(c * width, 8)
    if stem == "small" and stage == 1:
      s = 1
    for i in range(n):
      configs.append((in_channels, out_channels, s if i == 0 else 1, t))
      in_channels = out_channels
  return configs


def relu6(x):
  return jnp.clip(x, 0.0, 6.0)


class InvertedResidual(nn.Module):
  in_channels: int
  out_channels: int
  stride: int
  expand_ratio: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    hidden = int(round(self.in_channels * self.expand_ratio))
    out = x
    if self.expand_ratio != 1:
      out = layers.ConvBN(hidden, 1, activation=relu6, dtype=self.dtype, name="expand")(out, train)
    out = layers.ConvBN(hidden, 3, self.stride, groups=hidden, activation=relu6, dtype=self.dtype,
                        name="depthwise")(out, train)
    out = layers.ConvBN(self.out_channels, 1, dtype=self.dtype, name="project")(out, train)
    if self.stride == 1 and self.in_channels == self.out_channels:
      out = out + x
    return out


class MobileNetV2(nn.Module):
  num_classes: int
  stem: str = "imagenet"
  width: float = 1.0
  dtype: Any = jnp.float32
  dropout_rate: float = 0.2

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    layers.check_stem(self.stem)
    x = x.astype(self.dtype)
    stem_stride = 2 if self.stem == "imagenet" else 1
    x = layers.ConvBN(layers.make_divisible(STEM_CHANNELS * self.width, 8), 3, stem_stride,
                      activation=relu6, dtype=self.dtype, name="features_0")(x, train)
    configs = block_configs(self.width, self.stem)
    for index, (cin, cout, stride, t) in enumerate(configs, start=1):
      block = InvertedResidual(cin, cout, stride, t, dtype=self.dtype, name=f"features_{index}")
      x = block(x, train)
    last = layers.make_divisible(LAST_CHANNELS * self.width, 8)  # torchvision: max(1, width)
    x = layers.ConvBN(last, 1, activation=relu6, dtype=self.dtype,
                      name=f"features_{len(configs) + 1}")(x, train)
    features = layers.global_avg_pool(x).astype(jnp.float32)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(features)
    logits = layers.classifier(self.num_classes, self.dtype)(x)
    return (logits, features) if return_features else logits
