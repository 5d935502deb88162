"""The student's training views: which images, and how each is cropped, flipped and mixed.

For every (epoch, batch) of student training the plan fixes, from the seed alone:
  * the sample order (a seeded permutation of the image set per epoch, batch b = rows [bB, (b+1)B)),
  * per image a RandomResizedCrop box (pixels: top, left, height, width) and a flip flag,
    optionally a PatchShuffle permutation applied before the crop (RD3 / RDED),
  * per batch one CutMix draw (box, partner permutation, lambda).
`make_views` is the one function that turns uint8 images plus these parameters into the float
pixels a network sees. Relabel calls it to feed the teachers and stores the parameters; the train
stage calls it again on the stored parameters, so the student sees exactly what the teachers saw.
Keys are `fold_in(seed_key, epoch, batch, row)`: nothing depends on device count or on batching.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from prism_jax import errors
from prism_jax.data import augment as aug
from prism_jax.data import sources
from prism_jax.data import stats as data_stats

_RELABEL_STREAM = 0x5E1A  # separates relabel keys from other uses of the same seed


@dataclasses.dataclass(frozen=True)
class ViewSpec:
  """Static description of the views (part of every relabel fingerprint)."""
  image_size: int
  rrc_scale: tuple[float, float] = (0.25, 1.0)
  flip: bool = True
  cutmix: bool = True
  patch_shuffle_grid: int = 0          # 0: off; g: g x g PatchShuffle before the crop (RDED order)

  def validate(self) -> None:
    low, high = self.rrc_scale
    if not 0 < low <= high <= 1:
      raise errors.ConfigError(f"relabel.rrc_scale={self.rrc_scale}: expected 0 < low <= high <= 1")
    if self.patch_shuffle_grid < 0 or (self.patch_shuffle_grid and self.image_size % self.patch_shuffle_grid):
      raise errors.ConfigError(f"relabel.patch_shuffle_grid={self.patch_shuffle_grid}: expected 0 or a divisor of "
                       f"the image size {self.image_size}")


class ViewParams(NamedTuple):
  """Parameters of one batch of views (leading axis B except the CutMix box and lambdas)."""
  crop: jax.Array          # int32 (B, 4) top, left, height, width
  flip: jax.Array          # bool (B,)
  patch_perm: jax.Array    # int32 (B, g*g); (B, 1) identity when PatchShuffle is off
  cutmix_box: jax.Array    # int32 (4,) y0, y1, x0, x1; empty box when CutMix is off
  cutmix_perm: jax.Array   # int32 (B,)
  cutmix_lam: jax.Array    # float32 () fraction of each image that stays its own


# The ViewParams fields with one row per image (sharded with the batch); the others are per batch.
PER_IMAGE_FIELDS = ("crop", "flip", "patch_perm", "cutmix_perm")


def batch_key(seed: int, epoch: int, batch: int) -> jax.Array:
  key = jax.random.fold_in(jax.random.key(seed), _RELABEL_STREAM)
  return jax.random.fold_in(jax.random.fold_in(key, epoch), batch)


def sample_order(num_images: int, seed: int, epoch: int) -> np.ndarray:
  """The seeded sample order of one epoch (a permutation of the image set)."""
  return sources.epoch_permutation(num_images, seed + _RELABEL_STREAM, epoch)


def batch_indices(num_images: int, batch_size: int, seed: int, epoch: int, batch: int) -> np.ndarray:
  order = sample_order(num_images, seed, epoch)
  return order[batch * batch_size:(batch + 1) * batch_size].astype(np.int32)


def sample_view_params(key: jax.Array, batch_size: int, spec: ViewSpec) -> ViewParams:
  """Draws one batch's view parameters (jit with batch_size and spec static)."""
  hw = (spec.image_size, spec.image_size)
  row_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch_size))

  def per_image(k):
    crop_key, flip_key, patch_key = jax.random.split(k, 3)
    crop = aug.sample_rrc_params(crop_key, hw, spec.rrc_scale)
    flip = aug.sample_flip_params(flip_key) & spec.flip
    if spec.patch_shuffle_grid:
      perm = aug.sample_patch_shuffle_params(patch_key, spec.patch_shuffle_grid, "rded")
    else:
      perm = jnp.zeros((1,), jnp.int32)
    return crop, flip, perm

  crop, flip, perm = jax.vmap(per_image)(row_keys)
  cutmix_key = jax.random.fold_in(key, batch_size + 1)  # rows use fold_in(key, 0..B-1)
  if spec.cutmix:
    cm = aug.sample_cutmix_params(cutmix_key, batch_size, hw)
    box, cm_perm, lam = cm.box, cm.permutation, cm.lam
  else:
    box = jnp.zeros((4,), jnp.int32)
    cm_perm = jnp.arange(batch_size, dtype=jnp.int32)
    lam = jnp.ones((), jnp.float32)
  return ViewParams(crop.astype(jnp.int32), flip, perm.astype(jnp.int32), box.astype(jnp.int32),
                    cm_perm, lam.astype(jnp.float32))


def make_views(images_u8: jax.Array, params: ViewParams, spec: ViewSpec) -> jax.Array:
  """(B, H, W, 3) uint8 images -> (B, S, S, 3) float32 pixels in [0, 1] the networks see.

  Order of the references: PatchShuffle -> RandomResizedCrop -> flip per image, then one CutMix for
  the batch (box region of image b taken from image cutmix_perm[b]).
  """
  x = images_u8.astype(jnp.float32) / 255.0
  out_hw = (spec.image_size, spec.image_size)

  def per_image(image, crop, flip, perm):
    if spec.patch_shuffle_grid:
      image = aug.apply_patch_shuffle(image, perm)
    image = aug.apply_rrc(image, crop, out_hw)
    return aug.apply_flip(image, flip)

  x = jax.vmap(per_image)(x, params.crop, params.flip, params.patch_perm)
  if spec.cutmix:
    x = aug.apply_cutmix(x, aug.CutMixParams(params.cutmix_box, params.cutmix_perm, params.cutmix_lam,
                                             params.cutmix_lam))
  return x


def normalized_views(images_u8, params: ViewParams, spec: ViewSpec, mean, std) -> jax.Array:
  return data_stats.normalize(make_views(images_u8, params, spec), mean, std)
