"""ResNet-18/34/50/101 in the torchvision layout (v1.5: the stride sits on the bottleneck's 3x3).

Parameter names mirror torchvision (`conv1`, `bn1`, `layer1_0/conv1`, `layer1_0/downsample_conv`,
`fc`) so that `torchvision_import` needs only a short explicit key map.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from prism_jax.models import layers

# name -> (block kind, blocks per stage)
LAYOUTS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}
EXPANSION = {"basic": 1, "bottleneck": 4}
STAGE_PLANES = (64, 128, 256, 512)


class BasicBlock(nn.Module):
  planes: int
  stride: int
  downsample: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    out = layers.conv(self.planes, 3, self.stride, dtype=self.dtype, name="conv1")(x)
    out = nn.relu(layers.BatchNorm(dtype=self.dtype, name="bn1")(out, train))
    out = layers.conv(self.planes, 3, dtype=self.dtype, name="conv2")(out)
    out = layers.BatchNorm(dtype=self.dtype, name="bn2")(out, train)
    # The shortcut runs after the main path, as in torch, so BN forward order matches.
    shortcut = _shortcut(self, x, self.planes, train)
    return nn.relu(out + shortcut)


class Bottleneck(nn.Module):
  planes: int
  stride: int
  downsample: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    out = layers.conv(self.planes, 1, dtype=self.dtype, name="conv1")(x)
    out = nn.relu(layers.BatchNorm(dtype=self.dtype, name="bn1")(out, train))
    out = layers.conv(self.planes, 3, self.stride, dtype=self.dtype, name="conv2")(out)
    out = nn.relu(layers.BatchNorm(dtype=self.dtype, name="bn2")(out, train))
    out = layers.conv(self.planes * 4, 1, dtype=self.dtype, name="conv3")(out)
    out = layers.BatchNorm(dtype=self.dtype, name="bn3")(out, train)
    shortcut = _shortcut(self, x, self.planes * 4, train)
    return nn.relu(out + shortcut)


def _shortcut(block: nn.Module, x, out_channels: int, train: bool):
  if not block.downsample:
    return x
  x = layers.conv(out_channels, 1, block.stride, dtype=block.dtype, name="downsample_conv")(x)
  return layers.BatchNorm(dtype=block.dtype, name="downsample_bn")(x, train)


class ResNet(nn.Module):
  """`stem='imagenet'`: 7x7/2 conv + 3x3/2 max-pool; `stem='small'`: 3x3/1 conv, no max-pool."""
  arch: str
  num_classes: int
  stem: str = "imagenet"
  width: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    layers.check_stem(self.stem)
    kind, stage_sizes = LAYOUTS[self.arch]
    block_cls = BasicBlock if kind == "basic" else Bottleneck
    expansion = EXPANSION[kind]
    stem_channels = layers.scale_channels(64, self.width)
    x = x.astype(self.dtype)
    if self.stem == "imagenet":
      x = layers.conv(stem_channels, 7, 2, dtype=self.dtype, name="conv1")(x)
    else:
      x = layers.conv(stem_channels, 3, 1, dtype=self.dtype, name="conv1")(x)
    x = nn.relu(layers.BatchNorm(dtype=self.dtype, name="bn1")(x, train))
    if self.stem == "imagenet":
      x = layers.max_pool(x, 3, 2, padding=1)
    in_channels = stem_channels
    for stage, num_blocks in enumerate(stage_sizes):
      planes = layers.scale_channels(STAGE_PLANES[stage], self.width)
      for index in range(num_blocks):
        stride = 2 if stage > 0 and index == 0 else 1
        downsample = stride != 1 or in_channels != planes * expansion
        x = block_cls(planes, stride, downsample, dtype=self.dtype,
                      name=f"layer{stage + 1}_{index}")(x, train)
        in_channels = planes * expansion
    features = layers.global_avg_pool(x).astype(jnp.float32)
    logits = layers.classifier(self.num_classes, self.dtype, name="fc")(features)
    return (logits, features) if return_features else logits
