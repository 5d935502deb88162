"""EfficientNet-B0 in the torchvision layout (torch-origin weights: BN eps 1e-5, symmetric padding,
SiLU, squeeze-excitation, stochastic depth 0.2 that is the identity in eval, dropout 0.2).

`stem='small'`: the stem conv and the first stride-2 stage (24 channels) use stride 1, so a 32 px
input ends at 4x4. Width scales channels with torchvision's `_make_divisible(c * width, 8)`.
Stochastic depth in train mode draws from the 'dropout' RNG stream, one draw per sample ("row").
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from prism_jax.models import layers

# (expand ratio, kernel, first stride, input channels, output channels, layers): B0 table.
MBCONV_SETTING = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)
STOCHASTIC_DEPTH_PROB = 0.2
DROPOUT_RATE = 0.2


def block_configs(width: float, stem: str) -> list[list[dict[str, Any]]]:
  """Per stage (features_1 .. features_7), per block: MBConv arguments."""
  total = sum(setting[-1] for setting in MBCONV_SETTING)
  block_id = 0
  stages = []
  for stage, (expand, kernel, stride, cin, cout, num) in enumerate(MBCONV_SETTING):
    cin, cout = layers.make_divisible(cin * width, 8), layers.make_divisible(cout * width, 8)
    if stem == "small" and stage == 1:
      stride = 1
    blocks = []
    for i in range(num):
      blocks.append(dict(in_channels=cin if i == 0 else cout, out_channels=cout, kernel=kernel,
                         stride=stride if i == 0 else 1, expand_ratio=expand,
                         drop_prob=STOCHASTIC_DEPTH_PROB * block_id / total))
      block_id += 1
    stages.append(blocks)
  return stages


class SqueezeExcitation(nn.Module):
  squeeze_channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = jnp.mean(x, axis=(1, 2), keepdims=True)
    scale = nn.silu(layers.conv(self.squeeze_channels, 1, use_bias=True, dtype=self.dtype,
                                name="fc1")(scale))
    scale = layers.conv(x.shape[-1], 1, use_bias=True, dtype=self.dtype, name="fc2")(scale)
    return x * nn.sigmoid(scale)


class MBConv(nn.Module):
  in_channels: int
  out_channels: int
  kernel: int
  stride: int
  expand_ratio: int
  drop_prob: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    expanded = layers.make_divisible(self.in_channels * self.expand_ratio, 8)
    out = x
    if expanded != self.in_channels:
      out = layers.ConvBN(expanded, 1, activation=nn.silu, dtype=self.dtype,
                          name="expand")(out, train)
    out = layers.ConvBN(expanded, self.kernel, self.stride, groups=expanded, activation=nn.silu,
                        dtype=self.dtype, name="depthwise")(out, train)
    out = SqueezeExcitation(max(1, self.in_channels // 4), dtype=self.dtype, name="se")(out)
    out = layers.ConvBN(self.out_channels, 1, dtype=self.dtype, name="project")(out, train)
    if self.stride == 1 and self.in_channels == self.out_channels:
      if train and self.drop_prob > 0:
        keep = 1.0 - self.drop_prob
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (out.shape[0], 1, 1, 1))
        out = out * mask.astype(out.dtype) / keep
      out = out + x
    return out


class EfficientNetB0(nn.Module):
  num_classes: int
  stem: str = "imagenet"
  width: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    layers.check_stem(self.stem)
    stages = block_configs(self.width, self.stem)
    x = x.astype(self.dtype)
    stem_stride = 2 if self.stem == "imagenet" else 1
    x = layers.ConvBN(stages[0][0]["in_channels"], 3, stem_stride, activation=nn.silu,
                      dtype=self.dtype, name="features_0")(x, train)
    for stage, blocks in enumerate(stages, start=1):
      for index, config in enumerate(blocks):
        x = MBConv(**config, dtype=self.dtype, name=f"features_{stage}_{index}")(x, train)
    last = 4 * stages[-1][-1]["out_channels"]
    x = layers.ConvBN(last, 1, activation=nn.silu, dtype=self.dtype,
                      name=f"features_{len(stages) + 1}")(x, train)
    features = layers.global_avg_pool(x).astype(jnp.float32)
    x = nn.Dropout(DROPOUT_RATE, deterministic=not train)(features)
    logits = layers.classifier(self.num_classes, self.dtype)(x)
    return (logits, features) if return_features else logits
