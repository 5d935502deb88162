"""Random-resized-crop boxes (torchvision's `RandomResizedCrop.get_params`, seeded on the host),
cropping with resize, centred zero padding and RDED's stitching.

A box is (top, left, height, width) in pixels of the source image. Crops are resized with PIL's
bilinear filter, which averages over the source pixels when it shrinks (torchvision's
`antialias=True`).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

RRC_SCALE = (0.08, 1.0)   # RDED's RandomResizedCrop(scale=(0.08, 1), ratio=(1, 1))
RRC_RATIO = (1.0, 1.0)


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int,
                            scale: Sequence[float] = RRC_SCALE, ratio: Sequence[float] = RRC_RATIO
                            ) -> tuple[int, int, int, int]:
  """torchvision's RandomResizedCrop box: up to 10 tries of an area in `scale` x the image area and a
  log-uniform aspect ratio in `ratio`; else the central crop with the ratio clamped to `ratio`."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def crop_resize(image: np.ndarray, box: Sequence[int], size: int) -> np.ndarray:
  """The box of an (H, W, C) uint8 image resized to size x size (bilinear, antialiased), uint8."""
  top, left, h, w = (int(v) for v in box)
  patch = np.ascontiguousarray(image[top:top + h, left:left + w])
  if patch.shape[:2] == (size, size):
    return patch.copy()
  return np.asarray(Image.fromarray(patch).resize((size, size), Image.BILINEAR))


def resize(image: np.ndarray, size: int) -> np.ndarray:
  return crop_resize(image, (0, 0, image.shape[0], image.shape[1]), size)


def pad_centered(x: np.ndarray, size: int) -> np.ndarray:
  """(N, h, w, C) -> (N, size, size, C) with the patch in the centre and zeros around it (RDED pads
  its crops in normalized space, so zero is the data mean)."""
  n, h, w, c = x.shape
  if h > size or w > size:
    raise ValueError(f"a {h}x{w} patch does not fit in {size}x{size}")
  out = np.zeros((n, size, size, c), x.dtype)
  top, left = (size - h) // 2, (size - w) // 2
  out[:, top:top + h, left:left + w] = x
  return out


def cell_sizes(size: int, factor: int) -> list[int]:
  """The sides of the `factor` cells along an image side: size // factor each, one more pixel for the
  first `size % factor` of them (RDED's stitching)."""
  base, extra = divmod(size, factor)
  return [base + (1 if i < extra else 0) for i in range(factor)]


def nearest_resize(patch: np.ndarray, height: int, width: int) -> np.ndarray:
  """(h, w, C) -> (height, width, C) by nearest neighbour (torch's F.interpolate mode='nearest':
  source index floor(i * h / height))."""
  h, w = patch.shape[:2]
  rows = np.minimum((np.arange(height) * h) // height, h - 1)
  cols = np.minimum((np.arange(width) * w) // width, w - 1)
  return patch[rows][:, cols]


def stitch(ranked: np.ndarray, ipc: int, factor: int, size: int) -> tuple[np.ndarray, np.ndarray]:
  """RDED's stitching of a class's ranked crops (ipc * factor², h, w, C) into ipc images of size x size.

  Image t is a factor x factor grid whose cell k (row-major) holds crop k * ipc + t, so each image
  mixes ranks t, ipc + t, 2 ipc + t, ...; cells are nearest-resized to `cell_sizes`. Returns the
  images (ipc, size, size, C) and the crop index of each cell (ipc, factor²).
  """
  cells = factor * factor
  if len(ranked) != ipc * cells:
    raise ValueError(f"stitch: {len(ranked)} crops for {ipc} images of {cells} cells")
  sides = cell_sizes(size, factor)
  offsets = np.concatenate([[0], np.cumsum(sides)])
  images = np.zeros((ipc, size, size, ranked.shape[-1]), ranked.dtype)
  which = np.zeros((ipc, cells), np.int64)
  for t in range(ipc):
    for k in range(cells):
      r, c = divmod(k, factor)
      index = k * ipc + t
      which[t, k] = index
      images[t, offsets[r]:offsets[r + 1], offsets[c]:offsets[c + 1]] = nearest_resize(
          ranked[index], sides[r], sides[c])
  return images, which
