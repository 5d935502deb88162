"""The TFDS source: a prepared TensorFlow Datasets dataset read with random access (array_record),
or read into memory once when it is small and prepared as tfrecord only. Conventions: data/sources.py."""

from __future__ import annotations

import difflib

import numpy as np

from prism_jax import errors
from prism_jax.data import stats
from prism_jax.data.dataset import (EVAL_CROP_FRACTION, SPLITS, Dataset, _ArraySplit, _field, _map_images, _stack,
                                    resize_shorter_center_crop)

_TFDS_IN_MEMORY_BYTES = 4 << 30  # tfrecord-only TFDS splits up to this decoded size are read into memory


class _TfdsSplit:
  """Random access into an array_record TFDS split."""

  def __init__(self, source, image_key: str, labels: np.ndarray, size: int, shorter: int):
    self.source, self.image_key, self.labels, self.size, self.shorter = source, image_key, labels, size, shorter

  def read(self, rows: np.ndarray) -> np.ndarray:
    examples = self.source.__getitems__([int(r) for r in rows]) if len(rows) else []
    return _stack(_map_images(lambda ex: resize_shorter_center_crop(ex[self.image_key], self.shorter, self.size),
                              examples), self.size)




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
    raise errors.ConfigError("data.source='tfds' needs tensorflow-datasets, which is not installed (see "
                     "requirements.txt), or use an `arrays` / `imagefolder` source") from None
  return tfds


def _open_tfds(config, image_size: int, max_per_class: int) -> Dataset:
  tfds = _import_tfds()
  name, data_dir = _field(config, "name"), _field(config, "tfds_data_dir") or None
  try:
    builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
  except tfds.core.registered.DatasetNotFoundError as e:
    close = difflib.get_close_matches(stats.base_name(name), tfds.list_builders(with_community_datasets=False), n=5)
    raise errors.ConfigError(f"data.name={name!r}: not a TFDS dataset; expected a registered TFDS name such as "
                     f"cifar10, cifar100, imagenet2012, imagenette (tfds.list_builders() lists all)"
                     + (f"; close matches: {', '.join(close)}" if close else "")) from e
  where = f"data_dir {builder.data_dir} (data.tfds_data_dir={_field(config, 'tfds_data_dir')!r})"
  if not builder.is_prepared():
    raise errors.ConfigError(
        f"data.name={name!r}: the TFDS dataset is not prepared in {where}, and nothing is downloaded at run "
        f"time. Prepare it once on a machine with network access: `tfds build {name} "
        f"--data_dir={data_dir or '~/tensorflow_datasets'} --file_format=array_record` (imagenet2012 needs "
        "its manually downloaded archives in <data_dir>/downloads/manual), then point data.tfds_data_dir at it.")
  info = builder.info
  image_key, label_key = info.supervised_keys or ("image", "label")
  if image_key not in info.features or label_key not in info.features or not hasattr(info.features[label_key], "names"):
    raise errors.ConfigError(f"data.name={name!r}: expected an image-classification dataset with '{image_key}' and "
                     f"class-label '{label_key}' features, found {list(info.features)}")
  class_names = tuple(info.features[label_key].names)
  shape = info.features[image_key].shape
  fixed = shape[0] is not None and shape[1] is not None
  if image_size:
    size, shorter = image_size, (image_size if fixed else int(image_size / EVAL_CROP_FRACTION))
  elif fixed and shape[0] == shape[1]:
    size = shorter = shape[0]
  else:
    raise errors.ConfigError(f"data.image_size=0: {name} images have shape {shape} (variable or not square); "
                     "expected data.image_size > 0 for this dataset")
  splits = {}
  for split, key in (("train", "train_split"), ("test", "test_split")):
    splits[split] = _field(config, key)
    try:
      info.splits[splits[split]].num_examples
    except Exception as e:
      raise errors.ConfigError(f"data.{key}={splits[split]!r}: not a split of TFDS {name}; expected one of "
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
        raise errors.ConfigError(
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
      raise errors.ConfigError(f"data.name={name!r}: split '{splits[split]}' has labels outside 0..{len(class_names) - 1}")
  return Dataset(name=name, source="tfds", class_names=class_names, image_size=size, readers=readers,
                 origin=f"TFDS {name} in {where}", max_per_class=max_per_class)
