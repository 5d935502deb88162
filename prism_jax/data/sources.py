"""Image-classification data behind one interface, for every stage (teachers, recovery init, eval).

    dataset = open_dataset(config.data)
    dataset.read("train", indices) -> uint8 (len(indices), S, S, 3), in the order given
    dataset.labels("train")        -> int32 (N,)

Sources (`data.source`); nothing is ever downloaded:
  digits       scikit-learn's bundled 8x8 digits (1797 images, values 0..16) scaled to 0..255 with
               round(v * 255 / 16), upsampled 4x to 32x32 by pixel repetition (nearest neighbour, so
               the pixels are exact), gray copied to RGB. Split: for each class, a fixed seeded
               permutation (numpy PCG64, seed 0) of its images sends the first t_c to test, with t_c
               the class's share of 360 (largest remainders): 1437 train / 360 test, then both splits
               in the original sklearn order.
  arrays       `data.path`/{train,test}.npz with uint8 NHWC `images` (3 or 1 channels), integer
               `labels` and `class_names` (see shared/data/cifar10/README.md). Headers and labels
               are checked when opened; the images of a split are loaded on its first read.
  imagefolder  `data.path`/<split>/<class>/<image> with <split> = data.train_split / data.test_split
               (a missing 'test' falls back to 'val' then 'validation'); classes are the train split's
               folders sorted by name; images are sorted by file name inside each class, and the index
               order is class-major. Decoded with Pillow, converted to RGB.
  tfds         a prepared TFDS dataset `data.name` in `data.tfds_data_dir`, read with random access
               (array_record); a small dataset prepared as tfrecord only is read into memory once.
`data.path` may be local or a URL (gs://...; read through io/fs.py); TFDS reads a gs:// data_dir itself.

Image size S = data.image_size, or the source's native size when 0:
  * fixed-shape sources (digits, arrays, TFDS features with a static shape): images already S x S are
    untouched; otherwise the shorter side is resized to S (bilinear, antialiased as Pillow does) and
    the centre S x S kept, i.e. a square image is simply resized to S x S.
  * variable-shape sources (imagefolder, TFDS with unknown shape): the shorter side is resized to
    int(S / 0.875) (256 for 224) and the centre S x S is cropped, torchvision's `Resize + CenterCrop`
    evaluation transform, for BOTH splits: stored images are a deterministic eval-style view and
    random augmentation happens later, in JAX. An image already S x S is untouched. With
    image_size 0 all images must share one square size (that of the first train image).

`data.max_per_class` = N > 0 keeps, for each class, its first N train images (lowest indices); the
kept rows stay in their original order. The test split is never subset.

Normalization (`data.normalization`): 'auto' uses `stats.for_dataset(data.name)`, or, for a name
without known constants, the statistics of up to 10,000 evenly spaced train images; a preset name of
`stats.PRESETS`; 'dataset' always computes them; 'custom' takes `data.mean` / `data.std`.
"""

from __future__ import annotations

import concurrent.futures
import difflib
import os
import threading
import zipfile
from typing import Callable, Sequence

import ml_collections
import numpy as np
from PIL import Image

from prism_jax.data import stats
from prism_jax.io import fs

SOURCES = ("digits", "arrays", "imagefolder", "tfds")
SPLITS = ("train", "test")
NORMALIZATIONS = ("auto", "dataset", "custom") + tuple(stats.PRESETS)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")
EVAL_CROP_FRACTION = 0.875
_STATS_SAMPLE = 10_000           # train images read to compute unknown normalization statistics
_TFDS_IN_MEMORY_BYTES = 4 << 30  # tfrecord-only TFDS splits up to this decoded size are read into memory


def default_data_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.source = "digits"          # digits | arrays | imagefolder | tfds
  c.name = "digits"            # TFDS name for source=tfds, else a display name; selects 'auto' stats
  c.path = ""                  # directory for arrays (train.npz/test.npz) and imagefolder sources
  c.tfds_data_dir = ""         # '' = TFDS default data_dir
  c.image_size = 0             # 0 = native size; else resized (+ centre-cropped) to S x S, see module doc
  c.train_split = "train"      # split name (TFDS split, or imagefolder sub-directory)
  c.test_split = "test"        # imagenet2012 uses 'validation'
  c.max_per_class = 0          # 0 = all; N keeps the first N train images of each class (tiny runs)
  c.normalization = "auto"     # auto | dataset | custom | a stats.PRESETS name
  c.mean = ()                  # RGB mean in [0, 1] units, only with normalization='custom'
  c.std = ()                   # RGB std, only with normalization='custom'
  return c


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
    raise ValueError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e


class _FileSplit:
  """One image file per example (imagefolder)."""

  def __init__(self, files: list[str], labels: np.ndarray, size: int, shorter: int, native: bool):
    self.files, self.labels, self.size, self.shorter, self.native = files, labels, size, shorter, native

  def _load(self, row: int) -> np.ndarray:
    path = self.files[row]
    image = _decode(path)
    if self.native and image.shape[:2] != (self.size, self.size):
      raise ValueError(f"{path}: image is {image.shape[1]}x{image.shape[0]} but the first train image is "
                       f"{self.size}x{self.size}; set data.image_size to resize all images to one size")
    return resize_shorter_center_crop(image, self.shorter, self.size)

  def read(self, rows: np.ndarray) -> np.ndarray:
    return _stack(_map_images(self._load, [int(r) for r in rows]), self.size)


class _TfdsSplit:
  """Random access into an array_record TFDS split."""

  def __init__(self, source, image_key: str, labels: np.ndarray, size: int, shorter: int):
    self.source, self.image_key, self.labels, self.size, self.shorter = source, image_key, labels, size, shorter

  def read(self, rows: np.ndarray) -> np.ndarray:
    examples = self.source.__getitems__([int(r) for r in rows]) if len(rows) else []
    return _stack(_map_images(lambda ex: resize_shorter_center_crop(ex[self.image_key], self.shorter, self.size),
                              examples), self.size)


# ----------------------------------------------------------------------------- the dataset

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
      raise ValueError(f"{origin}: the train split has no images of class {', '.join(empty)}; "
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


# ----------------------------------------------------------------------------- opening

def _field(config, key: str):
  """config.key, or the default (lets callers pass older or partial data configs)."""
  if key in config:
    return config[key]
  return default_data_config()[key]


def open_dataset(config: ml_collections.ConfigDict) -> Dataset:
  """Opens the dataset described by a data config (`default_data_config()` lists the fields)."""
  source = _field(config, "source")
  image_size, max_per_class = int(_field(config, "image_size")), int(_field(config, "max_per_class"))
  if image_size < 0:
    raise ValueError(f"data.image_size={image_size}: expected 0 (native size) or a positive size")
  if max_per_class < 0:
    raise ValueError(f"data.max_per_class={max_per_class}: expected 0 (all) or a positive count")
  openers = {"digits": _open_digits, "arrays": _open_arrays, "imagefolder": _open_imagefolder,
             "tfds": _open_tfds}
  if source not in openers:
    raise ValueError(f"data.source={source!r}: expected one of {SOURCES}")
  dataset = openers[source](config, image_size, max_per_class)
  dataset.mean, dataset.std = _normalization(config, dataset)
  return dataset


def _normalization(config, dataset: Dataset):
  mode = _field(config, "normalization")
  if mode not in NORMALIZATIONS:
    raise ValueError(f"data.normalization={mode!r}: expected one of {NORMALIZATIONS}")
  if mode == "custom":
    mean, std = tuple(_field(config, "mean")), tuple(_field(config, "std"))
    for key, values in (("mean", mean), ("std", std)):
      if len(values) != 3 or not all(np.isfinite(values)):
        raise ValueError(f"data.{key}={values!r}: expected 3 finite RGB values with data.normalization='custom'")
    if min(std) <= 0:
      raise ValueError(f"data.std={std!r}: expected positive values")
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)
  if mode in stats.PRESETS:
    return stats.PRESETS[mode]
  known = stats.for_dataset(dataset.name) if mode == "auto" else None
  if known is not None:
    return known
  mean, std = stats.compute(dataset._full_train_batches(_STATS_SAMPLE))
  print(f"[data] {dataset.name}: normalization computed from up to {_STATS_SAMPLE} train images: "
        f"mean {tuple(round(v, 4) for v in mean)}, std {tuple(round(v, 4) for v in std)}", flush=True)
  if min(std) <= 0:
    raise ValueError(f"data.normalization={mode!r}: the train images of {dataset.name} have a constant "
                     "channel (std 0); set data.normalization='custom' with data.mean / data.std")
  return mean, std


# digits ----------------------------------------------------------------------

DIGITS_NATIVE_SIZE = 32
DIGITS_TEST_SIZE = 360


def digits_split() -> tuple[np.ndarray, np.ndarray]:
  """(train_rows, test_rows) into sklearn's load_digits(), each ascending; see the module docstring."""
  from sklearn.datasets import load_digits
  labels = load_digits().target
  counts = np.bincount(labels, minlength=10)
  quota = counts * DIGITS_TEST_SIZE / len(labels)
  take = np.floor(quota).astype(int)
  remainder_order = np.argsort(-(quota - take), kind="stable")
  take[remainder_order[:DIGITS_TEST_SIZE - take.sum()]] += 1
  rng = np.random.default_rng(0)
  test = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:take[c]] for c in range(10)])
  test = np.sort(test)
  train = np.setdiff1d(np.arange(len(labels)), test)
  return train, test


def _open_digits(config, image_size: int, max_per_class: int) -> Dataset:
  from sklearn.datasets import load_digits
  digits = load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)           # (1797, 8, 8)
  images = images.repeat(4, axis=1).repeat(4, axis=2)[..., None].repeat(3, axis=-1)  # (1797, 32, 32, 3)
  size = image_size or DIGITS_NATIVE_SIZE
  train, test = digits_split()
  readers = {split: _ArraySplit(digits.target[rows].astype(np.int32), size, lambda rows=rows: images[rows])
             for split, rows in (("train", train), ("test", test))}
  return Dataset(name=_field(config, "name") or "digits", source="digits",
                 class_names=[str(d) for d in range(10)], image_size=size, readers=readers,
                 origin="digits", max_per_class=max_per_class)


# arrays ----------------------------------------------------------------------

_ARRAY_FIELDS = ("images", "labels", "class_names")


def _npz_header(zf: zipfile.ZipFile, key: str) -> tuple[tuple[int, ...], np.dtype]:
  """(shape, dtype) of an .npz member without reading its data."""
  with zf.open(key + ".npy") as f:
    version = np.lib.format.read_magic(f)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = reader(f)
  return shape, dtype


def _npz_member(path: str, key: str) -> np.ndarray:
  try:
    with fs.open(path, "rb") as f, np.load(f, allow_pickle=False) as data:
      return data[key]
  except Exception as e:  # truncated/corrupt archive members, object arrays, ...
    raise ValueError(f"{path}: cannot read field '{key}' ({type(e).__name__}: {e}); "
                     "expected an intact np.savez file") from e


def _inspect_npz(path: str, split: str) -> dict:
  if not fs.exists(path) or fs.isdir(path):
    raise ValueError(f"{path}: file not found; expected the {split} split as an .npz file with fields "
                     f"{', '.join(_ARRAY_FIELDS)} (data.path is the directory holding train.npz and test.npz)")
  try:
    with fs.open(path, "rb") as f, zipfile.ZipFile(f) as zf:
      members = {name[:-4] for name in zf.namelist() if name.endswith(".npy")}
      shape, dtype = _npz_header(zf, "images") if "images" in members else (None, None)
  except Exception as e:  # not a zip, truncated, corrupt .npy header, ...
    raise ValueError(f"{path}: not a readable .npz file ({type(e).__name__}: {e}); "
                     "expected an intact np.savez/np.savez_compressed file") from e
  missing = [key for key in _ARRAY_FIELDS if key not in members]
  if missing:
    raise ValueError(f"{path}: missing field '{missing[0]}'; expected fields {', '.join(_ARRAY_FIELDS)} "
                     f"(found: {', '.join(sorted(members)) or 'none'})")
  if dtype != np.uint8:
    raise ValueError(f"{path}: field 'images' has dtype {dtype}; expected uint8 (pixel values 0..255)")
  if len(shape) != 4 or shape[-1] not in (1, 3):
    raise ValueError(f"{path}: field 'images' has shape {shape}; expected (N, H, W, 3) uint8 NHWC RGB "
                     "(or (N, H, W, 1) grayscale)")
  if shape[0] == 0:
    raise ValueError(f"{path}: field 'images' has no images (shape {shape}); expected at least one")
  labels, class_names = _npz_member(path, "labels"), _npz_member(path, "class_names")
  if labels.ndim != 1 or labels.dtype.kind not in "iu":
    raise ValueError(f"{path}: field 'labels' has shape {labels.shape} dtype {labels.dtype}; "
                     "expected a 1-D integer array")
  if len(labels) != shape[0]:
    raise ValueError(f"{path}: field 'labels' has {len(labels)} entries but field 'images' has {shape[0]} "
                     "images; expected one label per image")
  if class_names.ndim != 1 or class_names.dtype.kind not in "US" or len(class_names) == 0:
    raise ValueError(f"{path}: field 'class_names' has shape {class_names.shape} dtype {class_names.dtype}; "
                     "expected a non-empty 1-D array of strings")
  names = tuple(str(c.decode() if isinstance(c, bytes) else c) for c in class_names)
  if len(set(names)) != len(names):
    raise ValueError(f"{path}: field 'class_names' has duplicates {names}; expected unique names")
  if labels.min() < 0 or labels.max() >= len(names):
    raise ValueError(f"{path}: field 'labels' has values in [{labels.min()}, {labels.max()}]; expected "
                     f"class indices 0..{len(names) - 1} into field 'class_names' ({len(names)} classes)")
  return {"shape": shape, "labels": labels.astype(np.int32), "class_names": names}


def _open_arrays(config, image_size: int, max_per_class: int) -> Dataset:
  root = _field(config, "path")
  if not root:
    raise ValueError("data.path is empty: expected the directory holding train.npz and test.npz "
                     "for data.source='arrays'")
  paths = {split: os.path.join(root, f"{split}.npz") for split in SPLITS}
  info = {split: _inspect_npz(paths[split], split) for split in SPLITS}
  if info["test"]["class_names"] != info["train"]["class_names"]:
    raise ValueError(f"{paths['test']}: field 'class_names' is {info['test']['class_names']} but "
                     f"{paths['train']} has {info['train']['class_names']}; expected the same classes "
                     "in the same order")
  size = image_size
  if not size:
    for split in SPLITS:
      h, w = info[split]["shape"][1:3]
      if h != w:
        raise ValueError(f"{paths[split]}: field 'images' is {h}x{w} (not square); set data.image_size "
                         "to resize the shorter side and centre-crop, or store square images")
    size = info["train"]["shape"][1]
    if info["test"]["shape"][1] != size:
      raise ValueError(f"{paths['test']}: field 'images' is {info['test']['shape'][1]} px but train.npz is "
                       f"{size} px; expected one size (or set data.image_size)")

  def loader(split):
    def load():
      images = _npz_member(paths[split], "images")
      return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images
    return load

  readers = {split: _ArraySplit(info[split]["labels"], size, loader(split)) for split in SPLITS}
  return Dataset(name=_field(config, "name") or os.path.basename(os.path.normpath(root)), source="arrays",
                 class_names=info["train"]["class_names"], image_size=size, readers=readers,
                 origin=f"{paths['train']}: field 'labels'", max_per_class=max_per_class)


# imagefolder -----------------------------------------------------------------

def _list_dirs(path: str) -> list[str]:
  names = [name for name in fs.listdir(path) if not name.startswith(".")]
  is_dir = _map_images(fs.isdir, [os.path.join(path, name) for name in names])  # one request each on gs://
  return [name for name, d in zip(names, is_dir) if d]


def _open_imagefolder(config, image_size: int, max_per_class: int) -> Dataset:
  root = _field(config, "path")
  if not root:
    raise ValueError("data.path is empty: expected the directory holding train/<class>/ and test/<class>/ "
                     "for data.source='imagefolder'")
  if not fs.isdir(root):
    raise ValueError(f"{root}: directory not found (data.path); expected train/<class>/ and test/<class>/ in it")
  split_dirs = {}
  for split, key in (("train", "train_split"), ("test", "test_split")):
    wanted = _field(config, key)
    candidates = [wanted] + (["val", "validation"] if wanted == "test" else [])
    found = [os.path.join(root, c) for c in candidates if fs.isdir(os.path.join(root, c))]
    if not found:
      raise ValueError(f"{os.path.join(root, wanted)}: split directory not found (data.{key}={wanted!r}); "
                       f"expected {'/'.join(candidates)}/<class>/<images> under data.path")
    split_dirs[split] = found[0]
  class_names = _list_dirs(split_dirs["train"])
  if not class_names:
    raise ValueError(f"{split_dirs['train']}: no class sub-directories; expected one folder of images per class")
  files, labels = {}, {}
  for split, split_dir in split_dirs.items():
    folders = _list_dirs(split_dir)
    extra = [f for f in folders if f not in class_names]
    if extra:
      raise ValueError(f"{os.path.join(split_dir, extra[0])}: class folder not in the train split "
                       f"{split_dirs['train']}; expected classes {class_names}")
    files[split], labels[split] = [], []
    for label, name in enumerate(class_names):
      class_dir = os.path.join(split_dir, name)
      if name not in folders:
        continue
      images = sorted(f for f in fs.listdir(class_dir)
                      if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
      if not images:
        raise ValueError(f"{class_dir}: no image files; expected files ending in {', '.join(IMAGE_EXTENSIONS)}")
      files[split] += [os.path.join(class_dir, f) for f in images]
      labels[split] += [label] * len(images)
    if not files[split]:
      raise ValueError(f"{split_dir}: no class folders with images; expected <class>/<images> for the "
                       f"classes {class_names}")
  size, native = image_size, image_size == 0
  if native:
    h, w = _decode(files["train"][0]).shape[:2]
    if h != w:
      raise ValueError(f"{files['train'][0]}: image is {w}x{h} (not square); set data.image_size to resize the "
                       "shorter side and centre-crop")
    size = h
  shorter = size if native else int(size / EVAL_CROP_FRACTION)
  readers = {split: _FileSplit(files[split], np.asarray(labels[split], np.int32), size, shorter, native)
             for split in SPLITS}
  return Dataset(name=_field(config, "name") or os.path.basename(os.path.normpath(root)), source="imagefolder",
                 class_names=class_names, image_size=size, readers=readers, origin=split_dirs["train"],
                 max_per_class=max_per_class)


# tfds ------------------------------------------------------------------------

def _import_tfds():
  """tensorflow_datasets, with TensorFlow (if installed) kept off GPUs/TPUs: they belong to JAX."""
  from prism_jax.io import fs
  try:
    fs.import_tensorflow()
  except ImportError:
    pass
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise ValueError("data.source='tfds' needs tensorflow-datasets, which is not installed (see "
                     "requirements.txt), or use an `arrays` / `imagefolder` source") from None
  return tfds


def _open_tfds(config, image_size: int, max_per_class: int) -> Dataset:
  tfds = _import_tfds()
  name, data_dir = _field(config, "name"), _field(config, "tfds_data_dir") or None
  try:
    builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
  except tfds.core.registered.DatasetNotFoundError as e:
    close = difflib.get_close_matches(stats.base_name(name), tfds.list_builders(with_community_datasets=False), n=5)
    raise ValueError(f"data.name={name!r}: not a TFDS dataset; expected a registered TFDS name such as "
                     f"cifar10, cifar100, imagenet2012, imagenette (tfds.list_builders() lists all)"
                     + (f"; close matches: {', '.join(close)}" if close else "")) from e
  where = f"data_dir {builder.data_dir} (data.tfds_data_dir={_field(config, 'tfds_data_dir')!r})"
  if not builder.is_prepared():
    raise ValueError(
        f"data.name={name!r}: the TFDS dataset is not prepared in {where}, and nothing is downloaded at run "
        f"time. Prepare it once on a machine with network access: `tfds build {name} "
        f"--data_dir={data_dir or '~/tensorflow_datasets'} --file_format=array_record` (imagenet2012 needs "
        "its manually downloaded archives in <data_dir>/downloads/manual), then point data.tfds_data_dir at it.")
  info = builder.info
  image_key, label_key = info.supervised_keys or ("image", "label")
  if image_key not in info.features or label_key not in info.features or not hasattr(info.features[label_key], "names"):
    raise ValueError(f"data.name={name!r}: expected an image-classification dataset with '{image_key}' and "
                     f"class-label '{label_key}' features, found {list(info.features)}")
  class_names = tuple(info.features[label_key].names)
  shape = info.features[image_key].shape
  fixed = shape[0] is not None and shape[1] is not None
  if image_size:
    size, shorter = image_size, (image_size if fixed else int(image_size / EVAL_CROP_FRACTION))
  elif fixed and shape[0] == shape[1]:
    size = shorter = shape[0]
  else:
    raise ValueError(f"data.image_size=0: {name} images have shape {shape} (variable or not square); "
                     "expected data.image_size > 0 for this dataset")
  splits = {}
  for split, key in (("train", "train_split"), ("test", "test_split")):
    splits[split] = _field(config, key)
    try:
      info.splits[splits[split]].num_examples
    except Exception as e:
      raise ValueError(f"data.{key}={splits[split]!r}: not a split of TFDS {name}; expected one of "
                       f"{sorted(info.splits)} (slices such as 'train[:10%]' are allowed)") from e

  random_access = any(f.value == "array_record" for f in info.available_file_formats())
  readers = {}
  for split, split_name in splits.items():
    if random_access:
      source = tfds.data_source(name, split=split_name, data_dir=data_dir, download=False, try_gcs=False)
      labels_only = tfds.data_source(name, split=split_name, data_dir=data_dir, download=False, try_gcs=False,
                                     decoders={image_key: tfds.decode.SkipDecoding()})
      labels = np.empty(len(labels_only), np.int32)
      for start in range(0, len(labels), 4096):
        chunk = labels_only.__getitems__(list(range(start, min(start + 4096, len(labels)))))
        labels[start:start + len(chunk)] = [ex[label_key] for ex in chunk]
      readers[split] = _TfdsSplit(source, image_key, labels, size, shorter)
    else:
      num = info.splits[split_name].num_examples
      if num * size * size * 3 > _TFDS_IN_MEMORY_BYTES:
        raise ValueError(
            f"data.name={name!r}: the split '{split_name}' in {where} is stored as "
            f"{info.file_format.value if info.file_format else 'tfrecord'}, which has no random access, and "
            f"is too large ({num} images) to read into memory. Prepare it with `tfds build {name} "
            f"--data_dir=... --file_format=array_record`.")
      images, labels = [], []
      for ex in tfds.as_numpy(builder.as_dataset(split=split_name, shuffle_files=False)):
        images.append(resize_shorter_center_crop(ex[image_key], shorter, size))
        labels.append(int(ex[label_key]))
      stacked = _stack(images, size)
      readers[split] = _ArraySplit(np.asarray(labels, np.int32), size, lambda stacked=stacked: stacked)
  for split in SPLITS:
    bad = readers[split].labels
    if len(bad) and (bad.min() < 0 or bad.max() >= len(class_names)):
      raise ValueError(f"data.name={name!r}: split '{splits[split]}' has labels outside 0..{len(class_names) - 1}")
  return Dataset(name=name, source="tfds", class_names=class_names, image_size=size, readers=readers,
                 origin=f"TFDS {name} in {where}", max_per_class=max_per_class)
