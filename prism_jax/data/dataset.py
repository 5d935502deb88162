"""The Dataset every stage reads (see data/sources.py for the sources and their conventions), its
split readers, and the image helpers the sources share."""

from __future__ import annotations

import concurrent.futures
import os
import threading
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from prism_jax import errors
from prism_jax.data import stats
from prism_jax.io import fs
from prism_jax.schema import sections

SOURCES = ("digits", "arrays", "imagefolder", "tfds")
SPLITS = ("train", "test")
NORMALIZATIONS = ("auto", "dataset", "custom") + tuple(stats.PRESETS)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")
EVAL_CROP_FRACTION = 0.875




def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The example order of `epoch`: a pure function of (seed, epoch)."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


# ----------------------------------------------------------------------------- image preprocessing

def _to_rgb(image: np.ndarray) -> np.ndarray:
  if image.ndim == 2:
    image = image[..., None]
  return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def resize_shorter_center_crop(image: np.ndarray, shorter: int, size: int) -> np.ndarray:
  """uint8 HWC RGB -> shorter side resized to `shorter` (Pillow bilinear), centre `size` x `size` kept.

  An image already `size` x `size` is returned unchanged. Sizes and offsets follow torchvision's
  `Resize(shorter)` + `CenterCrop(size)`.
  """
  image = _to_rgb(image)
  h, w = image.shape[:2]
  if (h, w) == (size, size):
    return image
  if min(h, w) != shorter:
    new_h, new_w = (shorter, int(shorter * w / h)) if h <= w else (int(shorter * h / w), shorter)
    image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    h, w = new_h, new_w
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  return image[top:top + size, left:left + size]


_POOL_LOCK = threading.Lock()
_POOL: concurrent.futures.ThreadPoolExecutor | None = None


def _map_images(fn: Callable, items: Sequence) -> list:
  """fn over items on a shared thread pool (Pillow decodes and resizes without the GIL)."""
  global _POOL
  if len(items) < 8:
    return [fn(item) for item in items]
  with _POOL_LOCK:
    if _POOL is None:
      _POOL = concurrent.futures.ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1))
  return list(_POOL.map(fn, items))


def _stack(images: list, size: int) -> np.ndarray:
  if not images:
    return np.zeros((0, size, size, 3), np.uint8)
  return np.stack(images).astype(np.uint8, copy=False)


# ----------------------------------------------------------------------------- split readers
# A reader holds one split at the source's full size: `labels` (int32, all rows) and
# `read(rows) -> uint8 (n, S, S, 3)` with preprocessing applied.

class _ArraySplit:
  """Images already in memory (or loaded on first use by `load_images`)."""

  def __init__(self, labels: np.ndarray, size: int, load_images: Callable[[], np.ndarray]):
    self.labels, self.size = labels, size
    self._load_images, self._images, self._lock = load_images, None, threading.Lock()

  def read(self, rows: np.ndarray) -> np.ndarray:
    with self._lock:
      if self._images is None:
        self._images = self._load_images()
    batch = self._images[rows]
    if batch.shape[1:] == (self.size, self.size, 3):
      return batch
    return _stack(_map_images(lambda im: resize_shorter_center_crop(im, self.size, self.size), batch),
                  self.size)


def _decode(path: str) -> np.ndarray:
  try:
    with fs.open(path, "rb") as f, Image.open(f) as im:
      return np.asarray(im.convert("RGB"))
  except Exception as e:  # Pillow raises several types for corrupt or truncated files
    raise errors.ArtifactError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e


class _FileSplit:
  """One image file per example (imagefolder)."""

  def __init__(self, files: list[str], labels: np.ndarray, size: int, shorter: int, native: bool):
    self.files, self.labels, self.size, self.shorter, self.native = files, labels, size, shorter, native

  def _load(self, row: int) -> np.ndarray:
    path = self.files[row]
    image = _decode(path)
    if self.native and image.shape[:2] != (self.size, self.size):
      raise errors.ArtifactError(f"{path}: image is {image.shape[1]}x{image.shape[0]} but the first train image is "
                       f"{self.size}x{self.size}; set data.image_size to resize all images to one size")
    return resize_shorter_center_crop(image, self.shorter, self.size)

  def read(self, rows: np.ndarray) -> np.ndarray:
    return _stack(_map_images(self._load, [int(r) for r in rows]), self.size)


def _read_only(array: np.ndarray) -> np.ndarray:
  array.flags.writeable = False  # cached and shared with every caller
  return array


class Dataset:
  """A classification dataset with a 'train' and a 'test' split; see the module docstring."""

  def __init__(self, *, name: str, source: str, class_names: Sequence[str], image_size: int,
               readers: dict, origin: str, max_per_class: int = 0):
    self.name, self.source = name, source
    self.class_names = tuple(str(c) for c in class_names)
    self.num_classes = len(self.class_names)
    self.image_size = int(image_size)
    self.mean: tuple[float, float, float] = stats.PRESETS["imagenet"][0]
    self.std: tuple[float, float, float] = stats.PRESETS["imagenet"][1]
    self._readers = readers
    self._rows = {split: np.arange(len(readers[split].labels)) for split in SPLITS}
    if max_per_class > 0:
      train_labels = readers["train"].labels
      keep = np.concatenate([np.flatnonzero(train_labels == c)[:max_per_class] for c in range(self.num_classes)])
      self._rows["train"] = np.sort(keep)
    self._labels = {split: _read_only(readers[split].labels[self._rows[split]].astype(np.int32))
                    for split in SPLITS}
    self._class_indices: dict[str, list[np.ndarray]] = {}
    counts = np.bincount(self._labels["train"], minlength=self.num_classes)
    empty = [f"{c} ({self.class_names[c]!r})" for c in np.flatnonzero(counts == 0)]
    if empty:
      raise errors.ArtifactError(f"{origin}: the train split has no images of class {', '.join(empty)}; "
                       "expected at least one training image per class")

  def _check_split(self, split: str) -> None:
    if split not in SPLITS:
      raise ValueError(f"split={split!r}: expected one of {SPLITS}")

  def num_examples(self, split: str) -> int:
    self._check_split(split)
    return len(self._rows[split])

  def labels(self, split: str) -> np.ndarray:
    self._check_split(split)
    return self._labels[split]

  def class_indices(self, split: str) -> list[np.ndarray]:
    """Per class, the indices of its examples in ascending order (a fixed, documented order)."""
    self._check_split(split)
    if split not in self._class_indices:
      labels = self._labels[split]
      self._class_indices[split] = [_read_only(np.flatnonzero(labels == c)) for c in range(self.num_classes)]
    return self._class_indices[split]

  def read(self, split: str, indices) -> np.ndarray:
    """uint8 (len(indices), S, S, 3) images at `indices` (repeats allowed), in the order given."""
    self._check_split(split)
    idx = np.asarray(indices)
    if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
      raise ValueError(f"indices: expected a 1-D integer array, got shape {idx.shape} dtype {idx.dtype}")
    n = len(self._rows[split])
    if idx.size and (idx.min() < 0 or idx.max() >= n):
      raise IndexError(f"indices: values must be in [0, {n}) for the '{split}' split of {self.name}, "
                       f"got min {idx.min()} max {idx.max()}")
    return self._readers[split].read(self._rows[split][idx.astype(np.int64)])

  def fingerprint(self) -> dict:
    """What artifacts made from this data depend on; stored with them to detect mismatches."""
    return {"name": self.name, "source": self.source, "class_names": list(self.class_names),
            "image_size": self.image_size, "num_train": self.num_examples("train"),
            "num_test": self.num_examples("test"), "mean": list(self.mean), "std": list(self.std)}

  def _full_train_batches(self, limit: int, batch: int = 256):
    reader = self._readers["train"]
    total = len(reader.labels)
    rows = np.unique(np.linspace(0, total - 1, min(limit, total)).astype(np.int64))
    for start in range(0, len(rows), batch):
      yield reader.read(rows[start:start + batch])


def _field(config, key: str):
  """config.key, or the default (lets callers pass older or partial data configs)."""
  if key in config:
    return config[key]
  return sections.data_defaults()[key]
