"""Keyed image augmentation in pure JAX (NHWC float32), replayable from stored parameters.

Every augmentation is a pair: `sample_*_params(key, ...)` draws a few small arrays from an explicit
`jax.random` key, and `apply_*(image, params, ...)` is a deterministic function of the image and
those arrays. Relabel stores the parameters; the student step replays them and sees exactly the
inputs the teachers saw. All functions are jit-able and vmappable (no Python control flow on traced
values); the `apply_*` functions are differentiable w.r.t. the image.

Layout: an image is (H, W, C). Flip, roll, random crop and RandomResizedCrop also accept leading
batch axes (..., H, W, C) and then apply ONE parameter draw to every image, which is what torchvision
does on a 4-D tensor (SPEC 4.3). Per-image draws are `jax.vmap` over keys and images.

Semantics follow torchvision (RandomResizedCrop.get_params, F.resized_crop with bilinear
interpolation and antialias=False, RandomCrop with zero padding, torch.roll), the SRe2L/FKD CutMix
(`rand_bbox` in utils_fkd.py) and RDED's ShufflePatches.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

_RRC_ATTEMPTS = 10  # torchvision tries 10 boxes before falling back to a centre crop


# ----------------------------------------------------------------------------- RandomResizedCrop


def sample_rrc_params(key, image_hw: Sequence[int], scale: Sequence[float] = (0.08, 1.0),
                      ratio: Sequence[float] = (3 / 4, 4 / 3)) -> jax.Array:
  """Crop box (top, left, height, width) as int32[4], torchvision RandomResizedCrop.get_params.

  Ten candidate boxes are drawn at once (area fraction ~ U(scale), aspect ratio log-uniform in
  `ratio`, sides rounded half-to-even like Python's round); the first that fits is kept, its
  top/left uniform over the valid positions. If none fits, torchvision's centre-crop fallback.
  All randomness comes from one uniform draw (cheap to compile when vmapped over keys).
  """
  return rrc_params_from_uniforms(jax.random.uniform(key, (RRC_UNIFORMS,), jnp.float32), image_hw,
                                  scale, ratio)


RRC_UNIFORMS = 2 * _RRC_ATTEMPTS + 2  # U[0, 1) numbers one RandomResizedCrop draw consumes


def rrc_params_from_uniforms(uniforms: jax.Array, image_hw: Sequence[int], scale: Sequence[float],
                             ratio: Sequence[float]) -> jax.Array:
  """sample_rrc_params given its RRC_UNIFORMS uniforms (lets composite draws share one RNG call)."""
  height, width = int(image_hw[0]), int(image_hw[1])
  if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
    raise ValueError(f"rrc scale={tuple(scale)} / ratio={tuple(ratio)}: expected 0 < low <= high")
  area_u, ratio_u, position_u = jnp.split(uniforms, [_RRC_ATTEMPTS, 2 * _RRC_ATTEMPTS])
  target_area = height * width * (scale[0] + (scale[1] - scale[0]) * area_u)
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = jnp.exp(log_lo + (log_hi - log_lo) * ratio_u)
  crop_w = jnp.round(jnp.sqrt(target_area * aspect)).astype(jnp.int32)
  crop_h = jnp.round(jnp.sqrt(target_area / aspect)).astype(jnp.int32)
  fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
  first = jnp.argmax(fits)  # index of the first fitting attempt (0 if none fits)
  crop_h, crop_w = crop_h[first], crop_w[first]
  top = _uniform_int(position_u[0], height - crop_h + 1)
  left = _uniform_int(position_u[1], width - crop_w + 1)
  sampled = jnp.stack([top, left, crop_h, crop_w]).astype(jnp.int32)
  fallback = jnp.asarray(_centre_crop_fallback(height, width, ratio), jnp.int32)
  return jnp.where(jnp.any(fits), sampled, fallback)


def _uniform_int(u: jax.Array, count: jax.Array) -> jax.Array:
  """Maps u ~ U[0, 1) to an integer uniform over {0, ..., count-1} (count may be traced).

  floor(u * count) with float32 u: bias below count * 2^-23, negligible for pixel offsets; one
  uniform draw compiles much faster under vmap than jax.random.randint.
  """
  return jnp.minimum(jnp.floor(u * count.astype(jnp.float32)).astype(jnp.int32), count - 1)


def _centre_crop_fallback(height: int, width: int, ratio: Sequence[float]) -> tuple[int, int, int, int]:
  """torchvision's fallback box after 10 failed attempts (static: depends only on shapes)."""
  in_ratio = width / height
  if in_ratio < min(ratio):
    crop_w, crop_h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    crop_h, crop_w = height, int(round(height * max(ratio)))
  else:
    crop_h, crop_w = height, width
  return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def bilinear_weights(start, length, in_size: int, out_size: int) -> jax.Array:
  """(out_size, in_size) matrix resampling pixels [start, start+length) to out_size, bilinearly.

  PyTorch's upsample_bilinear2d with align_corners=False: source coordinate
  (dst + 0.5) * length / out_size - 0.5, clamped at 0; the upper neighbour is clamped to the last
  pixel of the crop (the crop's edge is replicated, pixels outside the crop are never read).
  """
  length = jnp.asarray(length, jnp.int32)
  scale = length.astype(jnp.float32) / out_size
  src = jnp.maximum((jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale - 0.5, 0.0)
  lower = jnp.minimum(jnp.floor(src).astype(jnp.int32), length - 1)
  upper = jnp.minimum(lower + 1, length - 1)
  upper_weight = (src - lower.astype(jnp.float32))[:, None]
  return ((1.0 - upper_weight) * jax.nn.one_hot(start + lower, in_size, dtype=jnp.float32)
          + upper_weight * jax.nn.one_hot(start + upper, in_size, dtype=jnp.float32))


def apply_rrc(image: jax.Array, params: jax.Array, out_hw: Sequence[int]) -> jax.Array:
  """Crops box `params` = (top, left, height, width) of (..., H, W, C) and resizes it to out_hw.

  torchvision `F.resized_crop(..., BILINEAR, antialias=False)` on a tensor, written as two small
  weight matrices so it is linear and differentiable in the image and deterministic on GPU (matmuls,
  no scatter-add in the gradient). When the crop is no larger than out_hw (always so for RRC to the
  input size) antialiasing would change nothing.
  """
  in_h, in_w = image.shape[-3], image.shape[-2]
  params = jnp.asarray(params, jnp.int32)
  row_weights = bilinear_weights(params[0], params[2], in_h, int(out_hw[0]))
  col_weights = bilinear_weights(params[1], params[3], in_w, int(out_hw[1]))
  highest = jax.lax.Precision.HIGHEST  # no TF32/bf16 passes: match torchvision's float32 result
  rows = jnp.einsum("oh,...hwc->...owc", row_weights, image.astype(jnp.float32), precision=highest)
  out = jnp.einsum("pw,...owc->...opc", col_weights, rows, precision=highest)
  return out.astype(image.dtype)


# ----------------------------------------------------------------------------- flip, roll, crop


def sample_flip_params(key, p: float = 0.5) -> jax.Array:
  """Whether to flip horizontally: bool scalar, True with probability p."""
  return jax.random.bernoulli(key, p)


def apply_flip(image: jax.Array, flip) -> jax.Array:
  """Mirrors the W axis of (..., H, W, C) when `flip` is True."""
  return jnp.where(flip, jnp.flip(image, axis=-2), image)


def sample_roll_params(key, jitter: int) -> jax.Array:
  """Circular shift (shift_h, shift_w) as int32[2], each uniform over {0, ..., jitter} inclusive."""
  if jitter < 0:
    raise ValueError(f"jitter={jitter}: expected a non-negative number of pixels")
  return _uniform_int(jax.random.uniform(key, (2,)), jnp.int32(jitter + 1))


def apply_roll(image: jax.Array, shift: jax.Array) -> jax.Array:
  """torch.roll(image, (shift_h, shift_w), dims=(H, W)) on (..., H, W, C)."""
  shift = jnp.asarray(shift, jnp.int32)
  return jnp.roll(image, (shift[0], shift[1]), axis=(-3, -2))


def sample_random_crop_params(key, image_hw: Sequence[int], pad: int) -> jax.Array:
  """(top, left) as int32[2] in the zero-padded image, each uniform over {0, ..., 2*pad}.

  torchvision RandomCrop(size=image size, padding=pad): the output has the input's size.
  """
  del image_hw  # output size = input size, so the valid offsets depend only on pad
  if pad < 0:
    raise ValueError(f"pad={pad}: expected a non-negative number of pixels")
  return _uniform_int(jax.random.uniform(key, (2,)), jnp.int32(2 * pad + 1))


def apply_random_crop(image: jax.Array, params: jax.Array, pad: int) -> jax.Array:
  """Zero-pads H and W of (..., H, W, C) by `pad` and takes the input-sized window at (top, left)."""
  height, width = image.shape[-3], image.shape[-2]
  widths = [(0, 0)] * (image.ndim - 3) + [(pad, pad), (pad, pad), (0, 0)]
  padded = jnp.pad(image, widths)
  params = jnp.asarray(params, jnp.int32)
  rows = jax.lax.dynamic_slice_in_dim(padded, params[0], height, axis=image.ndim - 3)
  return jax.lax.dynamic_slice_in_dim(rows, params[1], width, axis=image.ndim - 2)


# ----------------------------------------------------------------------------- CutMix (batch)


class CutMixParams(NamedTuple):
  """One CutMix draw for a whole batch.

  box: int32[4] (y0, y1, x0, x1), half-open rows [y0, y1) and columns [x0, x1) taken from the partner.
  permutation: int32[B]; image b's box region comes from image permutation[b].
  lam_drawn: the Beta(alpha, alpha) draw that set the box size.
  lam: fraction of each image that is its own, 1 - box area / image area (for mixing hard labels).
  """
  box: jax.Array
  permutation: jax.Array
  lam_drawn: jax.Array
  lam: jax.Array


def sample_cutmix_params(key, batch_size: int, image_hw: Sequence[int], alpha: float = 1.0) -> CutMixParams:
  """CutMix box, partner permutation and lambda, as SRe2L/FKD `rand_bbox` draws them.

  cut = int(side * sqrt(1 - lam)) per axis, centre uniform over the pixels, box = centre +- cut // 2
  clipped to the image (so boxes near a border are smaller than cut).
  """
  height, width = int(image_hw[0]), int(image_hw[1])
  uniform_key, perm_key, beta_key = jax.random.split(key, 3)
  uniforms = jax.random.uniform(uniform_key, (3,), jnp.float32)
  # Beta(1, 1) is U(0, 1); skipping jax.random.beta's rejection sampler saves seconds of compile.
  lam_drawn = uniforms[0] if alpha == 1.0 else jax.random.beta(beta_key, alpha, alpha, dtype=jnp.float32)
  cut_ratio = jnp.sqrt(1.0 - lam_drawn)
  sides = jnp.array([height, width], jnp.int32)
  cut = jnp.floor(sides.astype(jnp.float32) * cut_ratio).astype(jnp.int32)
  centre = _uniform_int(uniforms[1:], sides)
  start = jnp.clip(centre - cut // 2, 0, sides)
  stop = jnp.clip(centre + cut // 2, 0, sides)
  box = jnp.stack([start[0], stop[0], start[1], stop[1]])
  box_area = (stop - start).prod().astype(jnp.float32)
  lam = 1.0 - box_area / float(height * width)
  permutation = jax.random.permutation(perm_key, batch_size).astype(jnp.int32)
  return CutMixParams(box, permutation, lam_drawn, lam)


def cutmix_mask(image_hw: Sequence[int], box: jax.Array) -> jax.Array:
  """(H, W, 1) bool mask of the box region."""
  rows = jnp.arange(int(image_hw[0]))
  cols = jnp.arange(int(image_hw[1]))
  in_rows = (rows >= box[0]) & (rows < box[1])
  in_cols = (cols >= box[2]) & (cols < box[3])
  return (in_rows[:, None] & in_cols[None, :])[:, :, None]


def apply_cutmix(batch: jax.Array, params: CutMixParams) -> jax.Array:
  """(B, H, W, C) batch whose box region of image b is replaced by image permutation[b]'s."""
  mask = cutmix_mask(batch.shape[-3:-1], params.box)
  return jnp.where(mask, batch[params.permutation], batch)


# ----------------------------------------------------------------------------- PatchShuffle


def sample_patch_shuffle_params(key, grid: int, mode: str = "rded") -> jax.Array:
  """Permutation int32[grid*grid] of the row-major grid cells: output cell k <- source cell perm[k].

  mode "rded": RDED's ShufflePatches (the one RD3 evaluates): independent permutations of the
  column strips and of the row strips, so output cell (r, c) = source cell (rows[r], cols[c]).
  mode "full": any permutation of the grid*grid cells, uniformly.
  """
  if grid < 1:
    raise ValueError(f"patch shuffle grid={grid}: expected a positive integer")
  if mode == "full":
    return jax.random.permutation(key, grid * grid).astype(jnp.int32)
  if mode == "rded":
    row_key, col_key = jax.random.split(key)
    rows = jax.random.permutation(row_key, grid)
    cols = jax.random.permutation(col_key, grid)
    return (rows[:, None] * grid + cols[None, :]).reshape(-1).astype(jnp.int32)
  raise ValueError(f"patch shuffle mode={mode!r}: expected 'rded' or 'full'")


def apply_patch_shuffle(image: jax.Array, permutation: jax.Array) -> jax.Array:
  """Rearranges the grid x grid patches of an (H, W, C) image; H and W must divide by grid."""
  grid = math.isqrt(permutation.shape[0])
  height, width, channels = image.shape
  if grid * grid != permutation.shape[0] or height % grid or width % grid:
    raise ValueError(f"patch shuffle: permutation of {permutation.shape[0]} cells on a {height}x{width} "
                     f"image; expected grid*grid cells with grid={grid} dividing H and W")
  ph, pw = height // grid, width // grid
  patches = image.reshape(grid, ph, grid, pw, channels).transpose(0, 2, 1, 3, 4).reshape(-1, ph, pw, channels)
  patches = patches[permutation]
  return patches.reshape(grid, grid, ph, pw, channels).transpose(0, 2, 1, 3, 4).reshape(image.shape)


# ----------------------------------------------------------------------------- recovery (SPEC 4.3)


class RecoverAugParams(NamedTuple):
  """Augmentation of one recovery iteration: crop int32[4] (top, left, h, w), flip bool, shift int32[2].

  Unbatched fields: one draw shared by the whole batch (the default). With a leading batch axis on
  every field: one draw per image (the per-image option).
  """
  crop: jax.Array
  flip: jax.Array
  shift: jax.Array


def sample_recover_aug_params(key, image_hw: Sequence[int], jitter: int,
                              scale: Sequence[float] = (0.08, 1.0), flip: bool = True,
                              ratio: Sequence[float] = (3 / 4, 4 / 3),
                              batch_size: int | None = None) -> RecoverAugParams:
  """RandomResizedCrop (to the input size) + horizontal flip p=0.5 + roll by U{0..jitter}^2.

  `flip=False` disables flipping. batch_size=None: one draw for the whole batch (SPEC 4.3, what the
  reference code does on a 4-D tensor); an int: one independent draw per image.
  """
  if batch_size is not None:
    keys = jax.random.split(key, batch_size)
    return jax.vmap(lambda k: sample_recover_aug_params(k, image_hw, jitter, scale, flip, ratio))(keys)
  if jitter < 0:
    raise ValueError(f"jitter={jitter}: expected a non-negative number of pixels")
  # One RNG call for crop, flip and shift: vmapped threefry calls dominate CPU compile time.
  uniforms = jax.random.uniform(key, (RRC_UNIFORMS + 3,), jnp.float32)
  crop = rrc_params_from_uniforms(uniforms[:RRC_UNIFORMS], image_hw, scale, ratio)
  do_flip = (uniforms[RRC_UNIFORMS] < 0.5) & flip
  shift = _uniform_int(uniforms[RRC_UNIFORMS + 1:], jnp.int32(jitter + 1))
  return RecoverAugParams(crop, do_flip, shift)


def apply_recover_aug(batch: jax.Array, params: RecoverAugParams) -> jax.Array:
  """Applies `params` to a (B, H, W, C) batch (or one (H, W, C) image); output has the input's shape.

  Shared params act on every image; per-image params (leading batch axis) are vmapped over images.
  """
  if params.flip.ndim == 1:
    return jax.vmap(apply_recover_aug)(batch, params)
  out_hw = batch.shape[-3:-1]
  image = apply_rrc(batch, params.crop, out_hw)
  image = apply_flip(image, params.flip)
  return apply_roll(image, params.shift)
