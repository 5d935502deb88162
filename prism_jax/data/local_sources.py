"""The local sources: digits (bundled with scikit-learn), arrays (.npz files) and imagefolder
(a directory of class folders). Conventions: data/sources.py."""

from __future__ import annotations

import os
import zipfile

import numpy as np

from prism_jax import errors
from prism_jax.data.dataset import (EVAL_CROP_FRACTION, IMAGE_EXTENSIONS, SPLITS, Dataset, _ArraySplit, _FileSplit,
                                    _decode, _field, _map_images)
from prism_jax.io import fs


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
    raise errors.ArtifactError(f"{path}: cannot read field '{key}' ({type(e).__name__}: {e}); "
                     "expected an intact np.savez file") from e


def _inspect_npz(path: str, split: str) -> dict:
  if not fs.exists(path) or fs.isdir(path):
    raise errors.ArtifactError(f"{path}: file not found; expected the {split} split as an .npz file with fields "
                     f"{', '.join(_ARRAY_FIELDS)} (data.path is the directory holding train.npz and test.npz)")
  try:
    with fs.open(path, "rb") as f, zipfile.ZipFile(f) as zf:
      members = {name[:-4] for name in zf.namelist() if name.endswith(".npy")}
      shape, dtype = _npz_header(zf, "images") if "images" in members else (None, None)
  except Exception as e:  # not a zip, truncated, corrupt .npy header, ...
    raise errors.ArtifactError(f"{path}: not a readable .npz file ({type(e).__name__}: {e}); "
                     "expected an intact np.savez/np.savez_compressed file") from e
  missing = [key for key in _ARRAY_FIELDS if key not in members]
  if missing:
    raise errors.ArtifactError(f"{path}: missing field '{missing[0]}'; expected fields {', '.join(_ARRAY_FIELDS)} "
                     f"(found: {', '.join(sorted(members)) or 'none'})")
  if dtype != np.uint8:
    raise errors.ArtifactError(f"{path}: field 'images' has dtype {dtype}; expected uint8 (pixel values 0..255)")
  if len(shape) != 4 or shape[-1] not in (1, 3):
    raise errors.ArtifactError(f"{path}: field 'images' has shape {shape}; expected (N, H, W, 3) uint8 NHWC RGB "
                     "(or (N, H, W, 1) grayscale)")
  if shape[0] == 0:
    raise errors.ArtifactError(f"{path}: field 'images' has no images (shape {shape}); expected at least one")
  labels, class_names = _npz_member(path, "labels"), _npz_member(path, "class_names")
  if labels.ndim != 1 or labels.dtype.kind not in "iu":
    raise errors.ArtifactError(f"{path}: field 'labels' has shape {labels.shape} dtype {labels.dtype}; "
                     "expected a 1-D integer array")
  if len(labels) != shape[0]:
    raise errors.ArtifactError(f"{path}: field 'labels' has {len(labels)} entries but field 'images' has {shape[0]} "
                     "images; expected one label per image")
  if class_names.ndim != 1 or class_names.dtype.kind not in "US" or len(class_names) == 0:
    raise errors.ArtifactError(f"{path}: field 'class_names' has shape {class_names.shape} dtype {class_names.dtype}; "
                     "expected a non-empty 1-D array of strings")
  names = tuple(str(c.decode() if isinstance(c, bytes) else c) for c in class_names)
  if len(set(names)) != len(names):
    raise errors.ArtifactError(f"{path}: field 'class_names' has duplicates {names}; expected unique names")
  if labels.min() < 0 or labels.max() >= len(names):
    raise errors.ArtifactError(f"{path}: field 'labels' has values in [{labels.min()}, {labels.max()}]; expected "
                     f"class indices 0..{len(names) - 1} into field 'class_names' ({len(names)} classes)")
  return {"shape": shape, "labels": labels.astype(np.int32), "class_names": names}


def _open_arrays(config, image_size: int, max_per_class: int) -> Dataset:
  root = _field(config, "path")
  if not root:
    raise errors.ConfigError("data.path is empty: expected the directory holding train.npz and test.npz "
                     "for data.source='arrays'")
  paths = {split: os.path.join(root, f"{split}.npz") for split in SPLITS}
  info = {split: _inspect_npz(paths[split], split) for split in SPLITS}
  if info["test"]["class_names"] != info["train"]["class_names"]:
    raise errors.ArtifactError(f"{paths['test']}: field 'class_names' is {info['test']['class_names']} but "
                     f"{paths['train']} has {info['train']['class_names']}; expected the same classes "
                     "in the same order")
  size = image_size
  if not size:
    for split in SPLITS:
      h, w = info[split]["shape"][1:3]
      if h != w:
        raise errors.ArtifactError(f"{paths[split]}: field 'images' is {h}x{w} (not square); set data.image_size "
                         "to resize the shorter side and centre-crop, or store square images")
    size = info["train"]["shape"][1]
    if info["test"]["shape"][1] != size:
      raise errors.ArtifactError(f"{paths['test']}: field 'images' is {info['test']['shape'][1]} px but train.npz is "
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
    raise errors.ConfigError("data.path is empty: expected the directory holding train/<class>/ and test/<class>/ "
                     "for data.source='imagefolder'")
  if not fs.isdir(root):
    raise errors.ArtifactError(f"{root}: directory not found (data.path); expected train/<class>/ and test/<class>/ in it")
  split_dirs = {}
  for split, key in (("train", "train_split"), ("test", "test_split")):
    wanted = _field(config, key)
    candidates = [wanted] + (["val", "validation"] if wanted == "test" else [])
    found = [os.path.join(root, c) for c in candidates if fs.isdir(os.path.join(root, c))]
    if not found:
      raise errors.ArtifactError(f"{os.path.join(root, wanted)}: split directory not found (data.{key}={wanted!r}); "
                       f"expected {'/'.join(candidates)}/<class>/<images> under data.path")
    split_dirs[split] = found[0]
  class_names = _list_dirs(split_dirs["train"])
  if not class_names:
    raise errors.ArtifactError(f"{split_dirs['train']}: no class sub-directories; expected one folder of images per class")
  files, labels = {}, {}
  for split, split_dir in split_dirs.items():
    folders = _list_dirs(split_dir)
    extra = [f for f in folders if f not in class_names]
    if extra:
      raise errors.ArtifactError(f"{os.path.join(split_dir, extra[0])}: class folder not in the train split "
                       f"{split_dirs['train']}; expected classes {class_names}")
    files[split], labels[split] = [], []
    for label, name in enumerate(class_names):
      class_dir = os.path.join(split_dir, name)
      if name not in folders:
        continue
      images = sorted(f for f in fs.listdir(class_dir)
                      if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
      if not images:
        raise errors.ArtifactError(f"{class_dir}: no image files; expected files ending in {', '.join(IMAGE_EXTENSIONS)}")
      files[split] += [os.path.join(class_dir, f) for f in images]
      labels[split] += [label] * len(images)
    if not files[split]:
      raise errors.ArtifactError(f"{split_dir}: no class folders with images; expected <class>/<images> for the "
                       f"classes {class_names}")
  size, native = image_size, image_size == 0
  if native:
    h, w = _decode(files["train"][0]).shape[:2]
    if h != w:
      raise errors.ArtifactError(f"{files['train'][0]}: image is {w}x{h} (not square); set data.image_size to resize the "
                       "shorter side and centre-crop")
    size = h
  shorter = size if native else int(size / EVAL_CROP_FRACTION)
  readers = {split: _FileSplit(files[split], np.asarray(labels[split], np.int32), size, shorter, native)
             for split in SPLITS}
  return Dataset(name=_field(config, "name") or os.path.basename(os.path.normpath(root)), source="imagefolder",
                 class_names=class_names, image_size=size, readers=readers, origin=split_dirs["train"],
                 max_per_class=max_per_class)


# tfds ------------------------------------------------------------------------
