"""Per-dataset normalization constants and the (de)normalization used by every stage.

Squeeze, recover (clipping and denormalization), relabel and evaluation must all use the statistics
the teacher was trained with (reference-methods.md §7.10), so they come from one place: the dataset
returned by `sources.open_dataset` carries `mean`/`std`, chosen here by `data.normalization`.

Constants, in [0, 1] pixel units, per RGB channel, and where they come from:
  imagenet       (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225): torchvision ImageNet statistics, used
                 by SRe2L, CDA, PRISM and DELT for ImageNet-1K and its subsets (imagenette, ...).
  cifar          (0.4914, 0.4822, 0.4465) / (0.2023, 0.1994, 0.2010): the SRe2L CIFAR pipeline
                 (`SRe2L/*small_dataset/squeeze_cifar.py L40-L47`, `recover_cifar.py L18-L42`, used
                 there for CIFAR-100) and DELT for CIFAR. The std is the widely copied per-image value,
                 not the dataset std; we keep it because the references do. Used for cifar10 and
                 cifar100.
  cifar10_exact  (0.4914, 0.4822, 0.4465) / (0.2470, 0.2435, 0.2616): the true CIFAR-10 train stats.
  cifar100_gvbsm (0.5071, 0.4867, 0.4408) / (0.2675, 0.2565, 0.2761): CIFAR-100 train stats, used by
                 G-VBSM/EDC for both CIFAR-10 and CIFAR-100.
  tiny_imagenet  (0.4802, 0.4481, 0.3975) / (0.2302, 0.2265, 0.2262): SRe2L/CDA/DELT Tiny-ImageNet
                 (`SRe2L/*small_dataset/utils.py L8-L33`); G-VBSM uses `imagenet` instead.
  digits         computed once from the `digits` source's train split (1437 images, sklearn digits
                 scaled to 0..255 with round(v * 255 / 16), nearest 4x upsampling, gray replicated to
                 RGB, so the three channels are equal); see `tests/test_data_sources.py`, which
                 recomputes it.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

Stats = tuple[tuple[float, float, float], tuple[float, float, float]]

PRESETS: dict[str, Stats] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar10_exact": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100_gvbsm": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "tiny_imagenet": ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
    "digits": ((0.3056, 0.3056, 0.3056), (0.3760, 0.3760, 0.3760)),
}

# Dataset name (TFDS name or display name; version / config suffixes are ignored) -> preset.
DATASET_PRESETS: dict[str, str] = {
    "cifar10": "cifar",
    "cifar100": "cifar",
    "imagenet2012": "imagenet",
    "imagenet2012_subset": "imagenet",
    "imagenet2012_real": "imagenet",
    "imagenet_resized": "imagenet",
    "imagenet_v2": "imagenet",
    "imagenette": "imagenet",
    "imagewang": "imagenet",
    "imagewoof": "imagenet",
    "imagenet": "imagenet",
    "imagenet1k": "imagenet",
    "tiny_imagenet": "tiny_imagenet",
    "tinyimagenet": "tiny_imagenet",
    "tiny-imagenet": "tiny_imagenet",
    "digits": "digits",
}


def base_name(name: str) -> str:
  """'cifar10:3.0.2' -> 'cifar10'; 'imagenette/full-size-v2' -> 'imagenette'."""
  return name.split(":")[0].split("/")[0].strip().lower()


def for_dataset(name: str) -> Stats | None:
  """The references' constants for a known dataset name, else None."""
  preset = DATASET_PRESETS.get(base_name(name))
  return PRESETS[preset] if preset else None


def _as_vector(values: Sequence[float], what: str) -> np.ndarray:
  vec = np.asarray(values, np.float32)
  if vec.shape != (3,):
    raise ValueError(f"{what}={tuple(np.ravel(values))!r}: expected 3 per-channel values (RGB)")
  return vec


def normalize(images: Any, mean: Sequence[float], std: Sequence[float]) -> Any:
  """uint8 images (0..255) or float images in [0, 1], channels last -> (x - mean) / std, float32.

  Works on NumPy and JAX arrays alike (the result has the input's array type).
  """
  x = images.astype(np.float32)
  if images.dtype == np.uint8:
    x = x / np.float32(255.0)
  return (x - _as_vector(mean, "mean")) / _as_vector(std, "std")


def denormalize(x: Any, mean: Sequence[float], std: Sequence[float]) -> Any:
  """Inverse of `normalize`: normalized images -> float images in [0, 1] units (not clipped)."""
  return x * _as_vector(std, "std") + _as_vector(mean, "mean")


def pixel_bounds(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel (low, high) of valid pixels in normalized space: ((0 - m) / s, (1 - m) / s)."""
  m, s = _as_vector(mean, "mean"), _as_vector(std, "std")
  return (0.0 - m) / s, (1.0 - m) / s


def compute(batches: Iterable[np.ndarray]) -> Stats:
  """Per-channel mean and population std, in [0, 1] units, of uint8 NHWC images given in batches."""
  count, total, total_sq = 0, np.zeros(3), np.zeros(3)
  for batch in batches:
    pixels = np.asarray(batch).reshape(-1, batch.shape[-1])
    count += pixels.shape[0]
    total += pixels.sum(axis=0, dtype=np.float64)
    total_sq += np.square(pixels, dtype=np.uint32).sum(axis=0, dtype=np.float64)
  if count == 0:
    raise ValueError("cannot compute normalization statistics of zero images")
  mean = total / count
  std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 0.0))
  return tuple(float(v) for v in mean / 255.0), tuple(float(v) for v in std / 255.0)  # type: ignore
