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

import ml_collections
import numpy as np

from prism_jax import errors
from prism_jax.data import stats
from prism_jax.data.dataset import (  # noqa: F401  (the data API, re-exported)
    EVAL_CROP_FRACTION, IMAGE_EXTENSIONS, NORMALIZATIONS, SOURCES, SPLITS, Dataset, epoch_permutation,
    _field, resize_shorter_center_crop)
from prism_jax.data.local_sources import DIGITS_NATIVE_SIZE, DIGITS_TEST_SIZE, digits_split  # noqa: F401
from prism_jax.data.local_sources import _open_arrays, _open_digits, _open_imagefolder
from prism_jax.data.tfds_source import _TfdsSplit, _import_tfds, _open_tfds  # noqa: F401
from prism_jax.schema import sections

default_data_config = sections.data_defaults  # the schema of config.data
_STATS_SAMPLE = 10_000  # train images read to compute unknown normalization statistics


# ----------------------------------------------------------------------------- opening

def open_dataset(config: ml_collections.ConfigDict) -> Dataset:
  """Opens the dataset described by a data config (`default_data_config()` lists the fields)."""
  source = _field(config, "source")
  image_size, max_per_class = int(_field(config, "image_size")), int(_field(config, "max_per_class"))
  if image_size < 0:
    raise errors.ConfigError(f"data.image_size={image_size}: expected 0 (native size) or a positive size")
  if max_per_class < 0:
    raise errors.ConfigError(f"data.max_per_class={max_per_class}: expected 0 (all) or a positive count")
  openers = {"digits": _open_digits, "arrays": _open_arrays, "imagefolder": _open_imagefolder,
             "tfds": _open_tfds}
  if source not in openers:
    raise errors.ConfigError(f"data.source={source!r}: expected one of {SOURCES}")
  dataset = openers[source](config, image_size, max_per_class)
  dataset.mean, dataset.std = _normalization(config, dataset)
  return dataset


def _normalization(config, dataset: Dataset):
  mode = _field(config, "normalization")
  if mode not in NORMALIZATIONS:
    raise errors.ConfigError(f"data.normalization={mode!r}: expected one of {NORMALIZATIONS}")
  if mode == "custom":
    mean, std = tuple(_field(config, "mean")), tuple(_field(config, "std"))
    for key, values in (("mean", mean), ("std", std)):
      if len(values) != 3 or not all(np.isfinite(values)):
        raise errors.ConfigError(f"data.{key}={values!r}: expected 3 finite RGB values with data.normalization='custom'")
    if min(std) <= 0:
      raise errors.ConfigError(f"data.std={std!r}: expected positive values")
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
    raise errors.ConfigError(f"data.normalization={mode!r}: the train images of {dataset.name} have a constant "
                     "channel (std 0); set data.normalization='custom' with data.mean / data.std")
  return mean, std
