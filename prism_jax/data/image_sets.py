"""Distilled image sets that relabel, train and evaluate consume, under one interface.

  <name>       a set the distill stage made in this work directory (io/layout.py: `recover` in
               recover/, any other in sets/<name>/distill/), e.g. 'recover', 'random_real'
  <path>       any directory holding an `images.npz` in the recover layout (another run's output)

`random_real_indices` is the random-real draw: IPC real training images per class drawn without
replacement from a seed (the RD3 / SRe2L baseline); the random_real method writes that set.

Every set carries its class order and a content hash; the artifacts made from a set record both, so
labels made for one set are never used with another.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np

from prism_jax import errors
from prism_jax.io import artifacts, fs, layout

RECOVER = "recover"
RANDOM_REAL = "random_real"
_RANDOM_REAL_STREAM = 0xBA5E


@dataclasses.dataclass(frozen=True)
class ImageSet:
  name: str
  images: np.ndarray        # uint8 (N, S, S, 3)
  labels: np.ndarray        # int32 (N,)
  class_names: tuple[str, ...]
  origin: str               # file or description, for messages

  @property
  def num_images(self) -> int:
    return int(self.images.shape[0])

  def content_hash(self) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(self.images).tobytes())
    h.update(np.ascontiguousarray(self.labels.astype(np.int32)).tobytes())
    h.update("\n".join(self.class_names).encode())
    return h.hexdigest()

  def fingerprint(self) -> dict:
    return {"name": self.name, "num_images": self.num_images, "sha256": self.content_hash(),
            "class_names": list(self.class_names), "image_shape": list(self.images.shape[1:])}


def random_real_indices(dataset, ipc: int, seed: int) -> np.ndarray:
  """Training-split indices of IPC images per class, chosen without replacement by a seeded
  generator, in class-major order (like the recover output)."""
  per_class = dataset.class_indices("train")
  smallest = min(len(rows) for rows in per_class)
  if ipc > smallest:
    raise errors.ConfigError(f"recover.ipc={ipc}: the random_real baseline needs {ipc} images per class but "
                             f"the smallest class of {dataset.name} has {smallest}")
  rng = np.random.default_rng([seed, _RANDOM_REAL_STREAM])
  chosen = np.concatenate([np.sort(rng.choice(rows, size=ipc, replace=False)) for rows in per_class])
  labels = dataset.labels("train")[chosen].astype(np.int32)
  order = np.lexsort((np.arange(len(chosen)), labels))  # class-major, like the recover output
  return chosen[order]


def random_real(dataset, ipc: int, seed: int) -> ImageSet:
  """The random-real set drawn in memory (the method random_real writes the same images)."""
  chosen = random_real_indices(dataset, ipc, seed)
  labels = dataset.labels("train")[chosen].astype(np.int32)
  return ImageSet(RANDOM_REAL, dataset.read("train", chosen), labels, tuple(dataset.class_names),
                  f"random_real(ipc={ipc}, seed={seed}) from {dataset.name}")


def load_npz(path: str, name: str) -> ImageSet:
  if not fs.exists(path):
    raise artifacts.ArtifactError(f"{path}: no image set here (expected an images.npz in the recover layout)")
  with fs.open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
    missing = [k for k in ("images", "labels", "class_names") if k not in z.files]
    if missing:
      raise artifacts.ArtifactError(f"{path}: missing arrays {missing}; expected images, labels, class_names")
    images, labels, class_names = z["images"], z["labels"], tuple(str(c) for c in z["class_names"])
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise artifacts.ArtifactError(f"{path}: images must be uint8 (N, H, W, 3), got {images.dtype} "
                                  f"{images.shape}")
  if labels.shape != (images.shape[0],) or (labels.size and (labels.min() < 0 or labels.max() >= len(class_names))):
    raise artifacts.ArtifactError(f"{path}: labels must be ({images.shape[0]},) integers in "
                                  f"[0, {len(class_names)})")
  return ImageSet(name, images, labels.astype(np.int32), class_names, path)


def load(name: str, *, workdir: str, dataset) -> ImageSet:
  """Opens image set `name` (made by the distill stage in `workdir`, or a directory holding an
  images.npz) and checks it matches the dataset's class order and image size."""
  if layout.is_directory_set(name):
    image_set = load_npz(os.path.join(name, layout.IMAGES_FILE), name)
  else:
    marker = layout.distilled_marker(workdir, name)
    if not fs.exists(marker):
      raise artifacts.ArtifactError(
          f"{layout.distilled_dir(workdir, name)}: no finished '{name}' set; run the distill stage first "
          "(--config.stage=distill, alias recover; it makes every set of config.image_sets)")
    image_set = load_npz(layout.images_file(workdir, name), name)
  if tuple(image_set.class_names) != tuple(dataset.class_names):
    raise artifacts.ArtifactError(
        f"{image_set.origin}: class order {list(image_set.class_names)[:5]}... differs from the data's "
        f"{list(dataset.class_names)[:5]}...; the set was made for another dataset or class order")
  size = dataset.image_size
  if image_set.images.shape[1:3] != (size, size):
    raise artifacts.ArtifactError(f"{image_set.origin}: images are {image_set.images.shape[1:3]}, the "
                                  f"data's image_size is {size}")
  return image_set
