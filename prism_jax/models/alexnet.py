"""AlexNet in the torchvision layout (no BatchNorm; dropout 0.5 in the classifier).

`AdaptiveAvgPool2d((6, 6))` is implemented for any input size with torch's bin rule, and the
flatten is NHWC (H, W, C order): `torchvision_import` permutes the first classifier's rows.
`stem='small'` (32-64 px): conv1 is 3x3 stride 1 (instead of 11x11 stride 4) and the adaptive pool
outputs 3x3 (a 32 px input reaches 3x3 after the three max-pools). Width scales conv channels and
the 4096-wide hidden layers.
Features (`return_features=True`) are the 4096-d input of the last Linear layer.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from prism_jax.models import layers

CONV_CHANNELS = (64, 192, 384, 256, 256)
HIDDEN = 4096
DROPOUT_RATE = 0.5


def pooled_size(stem: str) -> int:
  return 6 if stem == "imagenet" else 3


class AlexNet(nn.Module):
  num_classes: int
  stem: str = "imagenet"
  width: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    layers.check_stem(self.stem)
    c1, c2, c3, c4, c5 = (layers.scale_channels(c, self.width) for c in CONV_CHANNELS)
    hidden = layers.scale_channels(HIDDEN, self.width)
    x = x.astype(self.dtype)
    if self.stem == "imagenet":
      x = layers.conv(c1, 11, 4, padding=2, use_bias=True, dtype=self.dtype, name="conv1")(x)
    else:
      x = layers.conv(c1, 3, 1, use_bias=True, dtype=self.dtype, name="conv1")(x)
    x = layers.max_pool(nn.relu(x), 3, 2)
    x = nn.relu(layers.conv(c2, 5, use_bias=True, dtype=self.dtype, name="conv2")(x))
    x = layers.max_pool(x, 3, 2)
    x = nn.relu(layers.conv(c3, 3, use_bias=True, dtype=self.dtype, name="conv3")(x))
    x = nn.relu(layers.conv(c4, 3, use_bias=True, dtype=self.dtype, name="conv4")(x))
    x = nn.relu(layers.conv(c5, 3, use_bias=True, dtype=self.dtype, name="conv5")(x))
    x = layers.max_pool(x, 3, 2)
    size = pooled_size(self.stem)
    x = layers.adaptive_avg_pool(x, (size, size))
    x = x.reshape(x.shape[0], -1)  # (H, W, C) order
    x = nn.Dropout(DROPOUT_RATE, deterministic=not train)(x)
    x = nn.relu(nn.Dense(hidden, dtype=self.dtype, kernel_init=layers.dense_init, name="fc1")(x))
    x = nn.Dropout(DROPOUT_RATE, deterministic=not train)(x)
    x = nn.relu(nn.Dense(hidden, dtype=self.dtype, kernel_init=layers.dense_init, name="fc2")(x))
    features = x.astype(jnp.float32)
    logits = layers.classifier(self.num_classes, self.dtype, name="fc3")(x)
    return (logits, features) if return_features else logits
