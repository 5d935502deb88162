"""Building blocks shared by the teacher zoo: torch-style conv, BatchNorm, pooling, width rounding.

Conventions (each one matters for torchvision weight parity and BN-statistics matching):
- Convolutions always get explicit symmetric torch padding `(k - 1) // 2` (or a given value), never
  'SAME', which pads strided convs asymmetrically.
- `BatchNorm` is our own module (params 'scale'/'bias', batch_stats 'mean'/'var') so that
  `bn_stats.forward_with_bn_stats` can intercept it and so that its update rule is torch's:
  running_var is updated with the *unbiased* batch variance, with Flax momentum 0.9 (= torch 0.1).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# torchvision initializes convs with kaiming_normal(mode='fan_out'); Linear layers with
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (torch's default, variance_scaling(1/3, fan_in, uniform)).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
dense_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
  """torchvision's `_make_divisible`: nearest multiple of `divisor`, never more than 10% below."""
  min_value = divisor if min_value is None else min_value
  rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * value:
    rounded += divisor
  return rounded


def batch_moments(x: jax.Array, axes: Sequence[int] = (0, 1, 2)) -> tuple[jax.Array, jax.Array]:
  """Mean and biased variance in float32, two-pass (no E[x^2] - E[x]^2 cancellation)."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=tuple(axes), keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=tuple(axes))
  return jnp.squeeze(mean, axis=tuple(axes)), var


def conv(features: int, kernel_size: int, stride: int = 1, *, padding: int | None = None,
         groups: int = 1, use_bias: bool = False, dtype: Dtype = jnp.float32,
         name: str | None = None) -> "Conv":
  """Conv with torch-style explicit symmetric padding (default (k - 1) // 2, as torchvision)."""
  pad = (kernel_size - 1) // 2 if padding is None else padding
  return Conv(features, kernel_size, stride, pad, groups, use_bias, dtype=dtype, name=name)


class Conv(nn.Module):
  """2-D convolution, NHWC input, HWIO kernel: the same parameter tree as nn.Conv.

  XLA:CPU lowers some convolutions far slower than PyTorch (forward and input gradient; see
  benchmarks/teachers.py): grouped/depthwise convs by 10-100x, 1x1 convs by ~4x. With
  impl='auto' on CPU, depthwise convs are computed as a sum of k*k strided, shifted slices times
  per-channel weights (with a fusion boundary after it, see `_depthwise_by_shifts`), and stride-1
  1x1 convs as a matrix product; elsewhere (GPU/TPU) and for all other convs,
  lax.conv_general_dilated. The results agree to float rounding.
  """
  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  groups: int = 1
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  impl: str = "auto"  # 'auto', 'lax' (always lax.conv_general_dilated) or 'direct' (CPU forms)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, s, p, groups = self.kernel_size, self.stride, self.padding, self.groups
    in_channels = x.shape[-1]
    if in_channels % groups:
      raise ValueError(f"conv input channels {in_channels} not divisible by groups {groups}")
    kernel = self.param("kernel", conv_init, (k, k, in_channels // groups, self.features),
                        jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    direct = _use_cpu_forms(self.impl)
    depthwise = groups > 1 and groups == in_channels == self.features
    if direct and depthwise:
      y = _depthwise_by_shifts(x, kernel, s, p)
    elif direct and k == 1 and s == 1 and p == 0 and groups == 1:
      y = jnp.einsum("nhwc,cd->nhwd", x, kernel[0, 0])
    else:
      y = jax.lax.conv_general_dilated(x, kernel, (s, s), ((p, p), (p, p)),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       feature_group_count=groups)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(
          self.dtype)
    return y


def _use_cpu_forms(impl: str) -> bool:
  """Whether `Conv` uses its CPU forms: impl='direct', or impl='auto' when tracing for CPU."""
  if impl not in ("auto", "lax", "direct"):
    raise ValueError(f"conv impl must be 'auto', 'lax' or 'direct', got {impl!r}")
  return impl == "direct" or (impl == "auto" and jax.default_backend() == "cpu")


def _depthwise_by_shifts(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
  """Depthwise conv (torch padding `pad` on each side, floor output size) as k*k shifted slices.

  out[n, y, x, c] = sum_ij padded[n, y * stride + i, x * stride + j, c] * kernel[i, j, 0, c].
  Autodiff gives the input gradient as k*k zero-padded (for stride > 1 also dilated) copies of
  the output cotangent times the weights, which XLA fuses into one loop. On CPU the result goes
  through `_fusion_boundary`.
  """
  n, h, w, c = x.shape
  k = kernel.shape[0]
  out_h, out_w = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
  padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out = None
  for i in range(k):
    for j in range(k):
      end = (n, i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1, c)
      window = jax.lax.slice(padded, (0, i, j, 0), end, (1, stride, stride, 1))
      term = window * kernel[i, j, 0]
      out = term if out is None else out + term
  if jax.default_backend() != "cpu":  # impl='direct' elsewhere: a conditional may sync the host
    return out
  return _fusion_boundary(out, kernel[0, 0, 0, 0])


def _fusion_boundary(y: jax.Array, probe: jax.Array) -> jax.Array:
  """Returns `y` unchanged, but as the output of a conditional, which XLA cannot fuse through.

  Why: XLA:CPU fuses cheap elementwise producers into every consumer, duplicating them. The input
  gradient of `_depthwise_by_shifts` reads the incoming cotangent at k*k shifted positions, and
  that cotangent usually depends elementwise on this conv's own output (BN then ReLU6's mask, or
  any activation's derivative). Without a boundary XLA recomputes the whole k*k-tap forward sum
  (plus BN and the activation derivative) for each of the k*k reads: k^4 multiply-adds per
  gradient element instead of k^2. That made a depthwise -> BN -> ReLU6 -> 1x1 input gradient
  10-25x slower and MobileNetV2's forward+backward ~4x slower than PyTorch's on CPU. With the
  conditional, the conv output is written once in the forward pass, and the transposed
  conditional writes the cotangent once in the backward pass. (lax.optimization_barrier does not
  help: XLA:CPU removes it before fusion.)
  The predicate is true unless `probe` (a kernel entry) is NaN, in which case the other branch
  returns y + 0, the same values. It comes from the kernel, not the activations, so under vmap
  over images (or batch sharding) it stays an unbatched scalar and the cond stays a cond. The
  other branch is not a plain pass-through so that `lax.cond` does not prune the conditional.
  If the kernel is a compile-time constant (variables closed over by the jitted function rather
  than passed to it), XLA folds the predicate and the boundary is gone: same values, old speed.
  """
  return jax.lax.cond(probe == probe, lambda a: a, lambda a: a + jnp.zeros((), a.dtype), y)


class BatchNorm(nn.Module):
  """BatchNorm over N, H, W with torch semantics.

  Train mode normalizes with the biased batch variance and updates the running stats as
  `run = momentum * run + (1 - momentum) * batch` using the unbiased variance (as torch does).
  Eval mode normalizes with the running stats. Statistics are computed in float32.
  """
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    channels = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
    if train:
      mean, var = batch_moments(x, tuple(range(x.ndim - 1)))
      if not self.is_initializing():
        count = x.size // channels
        unbiased_var = var * (count / max(count - 1, 1))
        running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
        running_var.value = self.momentum * running_var.value + (1 - self.momentum) * unbiased_var
    else:
      mean, var = running_mean.value, running_var.value
    multiplier = scale * jax.lax.rsqrt(var + self.epsilon)
    y = (x.astype(jnp.float32) - mean) * multiplier + bias
    return y.astype(self.dtype)


class ConvBN(nn.Module):
  """torchvision's Conv2dNormActivation: conv (no bias) -> BatchNorm -> optional activation."""
  features: int
  kernel_size: int
  stride: int = 1
  groups: int = 1
  activation: Any = None  # a callable such as nn.relu, or None for a linear projection
  bn_epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = conv(self.features, self.kernel_size, self.stride, groups=self.groups, dtype=self.dtype,
             name="conv")(x)
    x = BatchNorm(epsilon=self.bn_epsilon, dtype=self.dtype, name="bn")(x, train)
    return x if self.activation is None else self.activation(x)


def classifier(features: int, dtype: Dtype, name: str = "classifier") -> nn.Dense:
  return nn.Dense(features, dtype=dtype, kernel_init=dense_init, name=name)


def max_pool(x: jax.Array, kernel: int, stride: int, padding: int = 0) -> jax.Array:
  """torch MaxPool2d (floor mode); flax pads with -inf, exactly like torch."""
  return nn.max_pool(x, (kernel, kernel), (stride, stride),
                     padding=((padding, padding), (padding, padding)))


def global_avg_pool(x: jax.Array) -> jax.Array:
  return jnp.mean(x, axis=(1, 2))


def _adaptive_bins(in_size: int, out_size: int) -> list[tuple[int, int]]:
  # torch: start = floor(i * in / out), end = ceil((i + 1) * in / out).
  return [((i * in_size) // out_size, -((-(i + 1) * in_size) // out_size)) for i in range(out_size)]


def adaptive_avg_pool(x: jax.Array, out_size: tuple[int, int]) -> jax.Array:
  """torch AdaptiveAvgPool2d on NHWC for any input size (bins may overlap or repeat)."""
  # Separable: the mean over a rectangle is the mean over rows of the means over columns.
  rows = [jnp.mean(x[:, a:b], axis=1, keepdims=True)
          for a, b in _adaptive_bins(x.shape[1], out_size[0])]
  x = jnp.concatenate(rows, axis=1)
  cols = [jnp.mean(x[:, :, a:b], axis=2, keepdims=True)
          for a, b in _adaptive_bins(x.shape[2], out_size[1])]
  return jnp.concatenate(cols, axis=2)


def check_stem(stem: str) -> None:
  if stem not in ("imagenet", "small"):
    raise ValueError(f"stem must be 'imagenet' or 'small', got {stem!r}")


def scale_channels(channels: int, width: float, divisor: int = 8) -> int:
  """Channel count under a width multiplier; width 1.0 keeps torchvision's exact counts."""
  if width <= 0:
    raise ValueError(f"width must be > 0, got {width}")
  return channels if width == 1.0 else make_divisible(channels * width, divisor)
