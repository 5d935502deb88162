"""Feature diversity of an image set (SPEC 8; PRISM paper Fig. 4).

A fixed reference model (by default the dataset's resnet18 teacher) embeds every image into its pooled
penultimate features; diversity is the mean pairwise cosine similarity of those features between
distinct images of the same class (lower = more diverse), with the across-class similarity as a
companion. The similarity statistics are computed from per-class sums of unit vectors, so memory is
O(N * D) rather than O(N^2): ImageNet-1K at 50 images per class is 50,000 images.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np

from prism_jax import models
from prism_jax.data import stats


@functools.partial(jax.jit, static_argnames=("model", "mean", "std"))
def _batch_features(model: nn.Module, variables: Mapping[str, Any], images_u8: jax.Array,
                    mean: tuple[float, ...], std: tuple[float, ...]) -> jax.Array:
  """Eval-mode penultimate features of one uint8 batch; normalizing on device sends 4x fewer bytes."""
  x = stats.normalize(images_u8, mean, std)
  return models.forward_with_bn_stats(model, variables, x).features


def extract_features(model: nn.Module, variables: Mapping[str, Any], images_u8: np.ndarray,
                     mean: Sequence[float], std: Sequence[float], batch_size: int = 256) -> np.ndarray:
  """Pooled penultimate features (N, D) float32 of uint8 NHWC images, in eval mode.

  Every batch has the same size, min(batch_size, N): the last one is padded with zero images and the
  padding's rows are dropped, so the forward pass compiles once. Eval-mode BatchNorm uses running
  statistics, so padding does not change the other images' features.
  """
  images_u8 = np.asarray(images_u8)
  if images_u8.ndim != 4:
    raise ValueError(f"images_u8 has shape {images_u8.shape}: expected (N, H, W, C) images")
  if images_u8.dtype != np.uint8:
    raise ValueError(f"images_u8 has dtype {images_u8.dtype}: expected uint8 pixels (0..255)")
  if int(batch_size) < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  num_images = images_u8.shape[0]
  if num_images == 0:
    raise ValueError("extract_features got zero images")
  mean_key = tuple(float(v) for v in mean)
  std_key = tuple(float(v) for v in std)
  size = min(int(batch_size), num_images)
  chunks = []
  for start in range(0, num_images, size):
    batch = images_u8[start:start + size]
    valid = batch.shape[0]
    if valid < size:
      padding = np.zeros((size - valid,) + batch.shape[1:], np.uint8)
      batch = np.concatenate([batch, padding])
    features = _batch_features(model, variables, batch, mean_key, std_key)
    chunks.append(np.asarray(features, np.float32)[:valid])
  return np.concatenate(chunks)


def _nan_mean(values: np.ndarray) -> float:
  finite = values[~np.isnan(values)]
  return float(finite.mean()) if finite.size else float("nan")


def _nan_std(values: np.ndarray) -> float:
  finite = values[~np.isnan(values)]
  return float(finite.std()) if finite.size else float("nan")


def cosine_similarity_stats(features: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
  """Intra- and inter-class mean pairwise cosine similarity of feature rows.

  Returns plain Python values:
    intra_per_class[c]: mean cosine similarity over pairs of distinct images of class c (NaN when the
      class has fewer than 2 images);
    intra_mean / intra_std: mean and std of intra_per_class over classes that have a value;
    inter_per_class[c]: mean similarity of class c's images to all images of other classes (NaN when
      there is no such pair);
    inter_mean: mean similarity over all pairs of images from different classes (NaN if none);
    count_per_class[c], num_images.
  Zero feature rows stay zero after normalization (similarity 0 to everything).
  """
  features = np.asarray(features, np.float64)
  labels = np.asarray(labels)
  num_classes = int(num_classes)
  if features.ndim != 2:
    raise ValueError(f"features has shape {features.shape}: expected (N, D)")
  if labels.shape != (features.shape[0],):
    raise ValueError(f"labels has shape {labels.shape}: expected ({features.shape[0]},), one per feature row")
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"labels range over [{labels.min()}, {labels.max()}]: expected values in "
                     f"[0, {num_classes - 1}] (num_classes={num_classes})")
  labels = labels.astype(np.int64)
  norms = np.linalg.norm(features, axis=1, keepdims=True)
  unit = features / np.maximum(norms, 1e-12)
  # Sum over ordered pairs (i, j) of u_i . u_j = |sum_i u_i|^2; removing the i == j terms (|u_i|^2,
  # 1 or 0 for a zero row) leaves the distinct pairs.
  class_sums = np.zeros((num_classes, features.shape[1]))
  np.add.at(class_sums, labels, unit)
  self_terms = np.bincount(labels, weights=np.sum(unit * unit, axis=1), minlength=num_classes)
  counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
  total_sum = class_sums.sum(axis=0)
  within = np.sum(class_sums * class_sums, axis=1)                 # sum over ordered same-class pairs
  intra = np.full(num_classes, np.nan)
  intra_pairs = counts * (counts - 1)
  has_intra = intra_pairs > 0
  intra[has_intra] = (within - self_terms)[has_intra] / intra_pairs[has_intra]
  inter = np.full(num_classes, np.nan)
  inter_pairs = counts * (counts.sum() - counts)
  has_inter = inter_pairs > 0
  inter[has_inter] = (class_sums @ total_sum - within)[has_inter] / inter_pairs[has_inter]
  across_pairs = counts.sum() ** 2 - np.sum(counts ** 2)              # ordered pairs, different classes
  across_sum = total_sum @ total_sum - within.sum()
  inter_mean = float(across_sum / across_pairs) if across_pairs > 0 else float("nan")
  return {
      "intra_mean": _nan_mean(intra),
      "intra_std": _nan_std(intra),
      "inter_mean": inter_mean,
      "intra_per_class": [float(v) for v in intra],
      "inter_per_class": [float(v) for v in inter],
      "count_per_class": [int(v) for v in counts],
      "num_images": int(labels.size),
  }
