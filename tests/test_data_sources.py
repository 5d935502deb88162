"""Data sources (digits, arrays, imagefolder, tfds) and normalization statistics."""

import os

import numpy as np
import pytest
from PIL import Image

from prism_jax.data import sources, stats


def data_config(**overrides):
  config = sources.default_data_config()
  config.update(overrides)
  return config


# ----------------------------------------------------------------------------- digits

@pytest.fixture(scope="module")
def digits():
  return sources.open_dataset(data_config())


def test_digits_shapes_classes_and_split(digits):
  from sklearn.datasets import load_digits
  assert digits.name == "digits" and digits.source == "digits"
  assert digits.class_names == tuple("0123456789") and digits.num_classes == 10
  assert digits.image_size == 32
  assert (digits.num_examples("train"), digits.num_examples("test")) == (1437, 360)
  for split in ("train", "test"):
    labels = digits.labels(split)
    assert labels.dtype == np.int32 and labels.shape == (digits.num_examples(split),)
    assert set(np.unique(labels)) == set(range(10))
  images = digits.read("test", np.array([5, 0, 5]))
  assert images.dtype == np.uint8 and images.shape == (3, 32, 32, 3)
  np.testing.assert_array_equal(images[0], images[2])
  # Pixels: round(v * 255 / 16) of the sklearn image, nearest 4x upsampling, gray -> RGB.
  train_rows, test_rows = sources.digits_split()
  assert len(np.intersect1d(train_rows, test_rows)) == 0 and len(train_rows) + len(test_rows) == 1797
  assert np.all(np.diff(train_rows) > 0) and np.all(np.diff(test_rows) > 0)
  raw = load_digits()
  expected = np.round(raw.images[test_rows[0]] * 255 / 16).astype(np.uint8)
  np.testing.assert_array_equal(images[1, ::4, ::4, 0], expected)
  np.testing.assert_array_equal(images[1, 3::4, 3::4, 2], expected)
  np.testing.assert_array_equal(digits.labels("test"), raw.target[test_rows])
  # Stratified: every class's test share is within one image of 20%.
  test_counts = np.bincount(digits.labels("test"), minlength=10)
  all_counts = np.bincount(raw.target, minlength=10)
  assert np.all(np.abs(test_counts - all_counts * 360 / 1797) < 1)


def test_digits_is_deterministic_and_stats_match_the_preset(digits):
  again = sources.open_dataset(data_config())
  np.testing.assert_array_equal(again.labels("train"), digits.labels("train"))
  idx = np.array([0, 100, 1436])
  np.testing.assert_array_equal(again.read("train", idx), digits.read("train", idx))
  assert again.fingerprint() == digits.fingerprint()
  assert (digits.mean, digits.std) == stats.PRESETS["digits"]
  # The hard-coded constants are the statistics of the train split, to 4 decimals.
  mean, std = stats.compute([digits.read("train", np.arange(1437))])
  np.testing.assert_allclose(mean, digits.mean, atol=5e-5)
  np.testing.assert_allclose(std, digits.std, atol=5e-5)


def test_digits_resized_and_max_per_class():
  small = sources.open_dataset(data_config(image_size=16, max_per_class=3))
  assert small.image_size == 16 and small.read("test", np.arange(4)).shape == (4, 16, 16, 3)
  assert small.num_examples("train") == 30 and small.num_examples("test") == 360
  full = sources.open_dataset(data_config())
  for c, rows in enumerate(small.class_indices("train")):
    assert len(rows) == 3 and np.all(small.labels("train")[rows] == c)
  # The kept rows are each class's first three train images, in the original order.
  kept = np.sort(np.concatenate([rows[:3] for rows in full.class_indices("train")]))
  np.testing.assert_array_equal(small.labels("train"), full.labels("train")[kept])
  tiny32 = sources.open_dataset(data_config(max_per_class=3))
  np.testing.assert_array_equal(tiny32.read("train", np.arange(30)), full.read("train", kept))
  assert small.fingerprint()["num_train"] == 30


def test_class_indices_are_ascending_and_complete(digits):
  per_class = digits.class_indices("train")
  assert len(per_class) == 10
  for c, rows in enumerate(per_class):
    assert np.all(np.diff(rows) > 0) and np.all(digits.labels("train")[rows] == c)
  np.testing.assert_array_equal(np.sort(np.concatenate(per_class)), np.arange(1437))
  with pytest.raises(ValueError):  # cached arrays are shared: read-only
    digits.labels("train")[0] = 5


def test_read_rejects_bad_indices(digits):
  assert digits.read("train", np.array([], np.int64)).shape == (0, 32, 32, 3)
  with pytest.raises(IndexError, match="indices"):
    digits.read("train", np.array([1437]))
  with pytest.raises(IndexError, match="indices"):
    digits.read("test", np.array([-1]))
  with pytest.raises(ValueError, match="split='val'"):
    digits.labels("val")


# ----------------------------------------------------------------------------- config errors

def test_unknown_source_and_normalization_are_named():
  with pytest.raises(ValueError, match=r"data\.source='hdf5'.*digits.*arrays.*imagefolder.*tfds"):
    sources.open_dataset(data_config(source="hdf5"))
  with pytest.raises(ValueError, match=r"data\.normalization='imagenet21k'.*auto"):
    sources.open_dataset(data_config(normalization="imagenet21k"))
  with pytest.raises(ValueError, match=r"data\.mean"):
    sources.open_dataset(data_config(normalization="custom", mean=(0.5, 0.5), std=(0.2, 0.2, 0.2)))
  with pytest.raises(ValueError, match=r"data\.max_per_class"):
    sources.open_dataset(data_config(max_per_class=-1))


def test_normalization_presets_and_custom():
  custom = sources.open_dataset(data_config(normalization="custom", mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6)))
  assert (custom.mean, custom.std) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
  assert custom.fingerprint()["mean"] == [0.1, 0.2, 0.3]
  preset = sources.open_dataset(data_config(normalization="imagenet"))
  assert (preset.mean, preset.std) == stats.PRESETS["imagenet"]


def test_partial_config_uses_defaults():
  """Configs built without the newer fields (normalization, mean, std) still open."""
  import ml_collections
  config = ml_collections.ConfigDict({"source": "digits", "name": "digits", "path": "", "image_size": 0,
                                      "max_per_class": 0})
  assert sources.open_dataset(config).num_examples("test") == 360


# ----------------------------------------------------------------------------- arrays

CLASSES = np.array(["ant", "bee", "cat"])


def _tiny_arrays(seed=0, n=12, size=8):
  rng = np.random.default_rng(seed)
  return dict(images=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
              labels=(np.arange(n) * 7 % 3).astype(np.int64), class_names=CLASSES)


def _write_arrays(root, train=None, test=None):
  os.makedirs(root, exist_ok=True)
  for split, arrays in (("train", train or _tiny_arrays(0)), ("test", test or _tiny_arrays(1, n=6))):
    np.savez_compressed(os.path.join(root, f"{split}.npz"), **arrays)
  return str(root)


def test_arrays_round_trip(tmp_path):
  train, test = _tiny_arrays(0), _tiny_arrays(1, n=6)
  ds = sources.open_dataset(data_config(source="arrays", name="bugs", path=_write_arrays(tmp_path, train, test)))
  assert ds.class_names == ("ant", "bee", "cat") and ds.image_size == 8
  assert (ds.num_examples("train"), ds.num_examples("test")) == (12, 6)
  idx = np.array([11, 0, 3, 3])
  np.testing.assert_array_equal(ds.read("train", idx), train["images"][idx])
  np.testing.assert_array_equal(ds.read("test", np.arange(6)), test["images"])
  np.testing.assert_array_equal(ds.labels("train"), train["labels"])
  assert ds.labels("train").dtype == np.int32
  for c, rows in enumerate(ds.class_indices("train")):
    np.testing.assert_array_equal(rows, np.flatnonzero(train["labels"] == c))
  # An unknown name with normalization='auto' gets the statistics of its train images.
  mean, std = stats.compute([train["images"]])
  np.testing.assert_allclose(ds.mean, mean)
  np.testing.assert_allclose(ds.std, std)
  assert ds.fingerprint() == {"name": "bugs", "source": "arrays", "class_names": ["ant", "bee", "cat"],
                              "image_size": 8, "num_train": 12, "num_test": 6,
                              "mean": list(ds.mean), "std": list(ds.std)}
  # A known name uses the references' constants.
  cifar = sources.open_dataset(data_config(source="arrays", name="cifar10", path=str(tmp_path)))
  assert (cifar.mean, cifar.std) == stats.PRESETS["cifar"]


def test_arrays_resize_grayscale_and_max_per_class(tmp_path):
  train = _tiny_arrays(0)
  train["images"] = train["images"][..., :1]
  test = _tiny_arrays(1, n=6)
  test["images"] = test["images"][..., :1]
  root = _write_arrays(tmp_path, train, test)
  ds = sources.open_dataset(data_config(source="arrays", path=root, image_size=4, max_per_class=1,
                                        normalization="imagenet"))
  assert ds.num_examples("train") == 3
  np.testing.assert_array_equal(ds.labels("train"), [0, 1, 2])  # first of each class, original order
  images = ds.read("train", np.arange(3))
  assert images.shape == (3, 4, 4, 3)
  rgb = np.repeat(train["images"][[0, 1, 2]], 3, axis=-1)
  expected = np.asarray(Image.fromarray(rgb[1]).resize((4, 4), Image.BILINEAR))
  np.testing.assert_array_equal(images[1], expected)


def _bad(case, train, test):
  """Mutates the tiny arrays for one bad-input case; returns (train, test)."""
  if case == "missing_key":
    del train["labels"]
  elif case == "dtype":
    train["images"] = train["images"].astype(np.float32)
  elif case == "ndim":
    test["images"] = test["images"][..., 0]
  elif case == "channels":
    train["images"] = np.concatenate([train["images"], train["images"][..., :1]], axis=-1)
  elif case == "label_high":
    test["labels"][2] = 3
  elif case == "label_negative":
    train["labels"][0] = -1
  elif case == "label_float":
    train["labels"] = train["labels"].astype(np.float32)
  elif case == "length":
    train["labels"] = train["labels"][:-1]
  elif case == "class_names":
    test["class_names"] = np.array(["ant", "cat", "bee"])
  elif case == "empty_class":
    train["labels"] = train["labels"] % 2
  elif case == "non_square":
    train["images"] = train["images"][:, :, :6]
    test["images"] = test["images"][:, :, :6]
  elif case == "size_mismatch":
    test["images"] = _tiny_arrays(1, n=6, size=10)["images"]
  elif case == "no_images":
    test = dict(images=np.zeros((0, 8, 8, 3), np.uint8), labels=np.zeros(0, np.int64), class_names=CLASSES)
  return train, test


BAD_CASES = [  # (case, file named, field named, words of the expectation)
    ("missing_key", "train.npz", "labels", "missing field"),
    ("dtype", "train.npz", "images", "expected uint8"),
    ("ndim", "test.npz", "images", "(N, H, W, 3)"),
    ("channels", "train.npz", "images", "(N, H, W, 3)"),
    ("label_high", "test.npz", "labels", "0..2"),
    ("label_negative", "train.npz", "labels", "0..2"),
    ("label_float", "train.npz", "labels", "integer"),
    ("length", "train.npz", "labels", "one label per image"),
    ("class_names", "test.npz", "class_names", "same classes in the same order"),
    ("empty_class", "train.npz", "labels", "no images of class 2 ('cat')"),
    ("non_square", "train.npz", "images", "not square"),
    ("size_mismatch", "test.npz", "images", "one size"),
    ("no_images", "test.npz", "images", "at least one"),
]


@pytest.mark.parametrize("case,file,field,expectation", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_arrays_bad_input_names_file_and_field(tmp_path, case, file, field, expectation):
  root = _write_arrays(tmp_path, *_bad(case, _tiny_arrays(0), _tiny_arrays(1, n=6)))
  with pytest.raises(ValueError) as error:
    sources.open_dataset(data_config(source="arrays", path=root))
  message = str(error.value)
  assert os.path.join(root, file) in message and f"'{field}'" in message and expectation in message, message


def test_arrays_missing_corrupt_and_unset_path(tmp_path):
  root = _write_arrays(tmp_path)
  os.remove(os.path.join(root, "test.npz"))
  with pytest.raises(ValueError, match=r"test\.npz: file not found"):
    sources.open_dataset(data_config(source="arrays", path=root))
  with open(os.path.join(root, "train.npz"), "rb") as f:
    payload = f.read()
  _write_arrays(tmp_path)
  with open(os.path.join(root, "train.npz"), "wb") as f:
    f.write(payload[:len(payload) // 2])  # truncated
  with pytest.raises(ValueError, match=r"train\.npz: not a readable \.npz file"):
    sources.open_dataset(data_config(source="arrays", path=root))
  import zipfile
  _write_arrays(tmp_path)
  with zipfile.ZipFile(os.path.join(root, "test.npz"), "w") as zf:  # a zip whose images.npy is garbage
    zf.writestr("images.npy", b"garbage")
  with pytest.raises(ValueError, match=r"test\.npz: not a readable \.npz file"):
    sources.open_dataset(data_config(source="arrays", path=root))
  with pytest.raises(ValueError, match=r"data\.path is empty"):
    sources.open_dataset(data_config(source="arrays", path=""))


# ----------------------------------------------------------------------------- imagefolder

def _png(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)


def test_imagefolder_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  pictures = {}
  for split, per_class in (("train", 3), ("val", 2)):
    for cls in ("zebra", "ape"):
      for i in range(per_class):
        pictures[split, cls, i] = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        _png(str(tmp_path / split / cls / f"img{i}.png"), pictures[split, cls, i])
  (tmp_path / "train" / "ape" / "notes.txt").write_text("not an image")
  ds = sources.open_dataset(data_config(source="imagefolder", name="zoo", path=str(tmp_path)))
  assert ds.class_names == ("ape", "zebra") and ds.image_size == 6  # sorted folder names; native size
  assert (ds.num_examples("train"), ds.num_examples("test")) == (6, 4)  # 'val' stands in for 'test'
  np.testing.assert_array_equal(ds.labels("train"), [0, 0, 0, 1, 1, 1])
  images = ds.read("train", np.array([4, 0]))
  np.testing.assert_array_equal(images[0], pictures["train", "zebra", 1])
  np.testing.assert_array_equal(images[1], pictures["train", "ape", 0])
  np.testing.assert_array_equal(ds.read("test", np.arange(4))[3], pictures["val", "zebra", 1])
  many = ds.read("train", np.arange(6).repeat(2))  # >= 8 images: the thread-pool path, same order
  np.testing.assert_array_equal(many[::2], ds.read("train", np.arange(6)))


def test_imagefolder_variable_size_resize_and_crop(tmp_path):
  rng = np.random.default_rng(1)
  wide = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
  for split in ("train", "test"):
    _png(str(tmp_path / split / "a" / "wide.png"), wide)
    _png(str(tmp_path / split / "a" / "tall.png"), rng.integers(0, 256, (40, 12, 3), dtype=np.uint8))
    _png(str(tmp_path / split / "b" / "gray.png"), rng.integers(0, 256, (16, 16), dtype=np.uint8))
  ds = sources.open_dataset(data_config(source="imagefolder", path=str(tmp_path), image_size=14))
  images = ds.read("test", np.arange(3))
  assert images.shape == (3, 14, 14, 3) and ds.image_size == 14
  # Shorter side -> int(14 / 0.875) = 16 (20x30 -> 16x24), centre 14x14 at (1, 5).
  expected = np.asarray(Image.fromarray(wide).resize((24, 16), Image.BILINEAR))[1:15, 5:19]
  np.testing.assert_array_equal(images[1], expected)  # files sorted: tall.png, wide.png
  assert np.all(images[2, ..., 0] == images[2, ..., 2])  # grayscale converted to RGB
  with pytest.raises(ValueError, match=r"wide\.png: image is 30x20 \(not square\)"):
    # image_size=0 needs square images of one size; the first train image (sorted) is tall.png 12x40
    os.remove(tmp_path / "train" / "a" / "tall.png")
    sources.open_dataset(data_config(source="imagefolder", path=str(tmp_path)))


def test_imagefolder_bad_input(tmp_path):
  image = np.zeros((4, 4, 3), np.uint8)
  _png(str(tmp_path / "train" / "a" / "x.png"), image)
  _png(str(tmp_path / "train" / "b" / "y.png"), image)
  with pytest.raises(ValueError, match=r"test: split directory not found \(data\.test_split='test'\)"):
    sources.open_dataset(data_config(source="imagefolder", path=str(tmp_path)))
  (tmp_path / "test").mkdir()
  with pytest.raises(ValueError, match=r"test: no class folders with images"):
    sources.open_dataset(data_config(source="imagefolder", path=str(tmp_path)))
  _png(str(tmp_path / "test" / "a" / "x.png"), image)
  (tmp_path / "test" / "b").mkdir()
  with pytest.raises(ValueError, match=r"test/b: no image files"):
    sources.open_dataset(data_config(source="imagefolder", path=str(tmp_path)))
  (tmp_path / "test" / "b" / "broken.png").write_bytes(b"not a png at all")
  _png(str(tmp_path / "test" / "b" / "ok.png"), np.zeros((5, 5, 3), np.uint8))
  ds = sources.open_dataset(data_config(source="imagefolder", path=str(tmp_path)))
  with pytest.raises(ValueError, match=r"test/b/broken\.png: cannot read image"):
    ds.read("test", np.array([1]))
  with pytest.raises(ValueError, match=r"test/b/ok\.png: image is 5x5 but the first train image is 4x4"):
    ds.read("test", np.array([2]))
  _png(str(tmp_path / "test" / "c" / "z.png"), image)
  with pytest.raises(ValueError, match=r"test/c: class folder not in the train split"):
    sources.open_dataset(data_config(source="imagefolder", path=str(tmp_path)))
  with pytest.raises(ValueError, match=r"nowhere: directory not found \(data\.path\)"):
    sources.open_dataset(data_config(source="imagefolder", path=str(tmp_path / "nowhere")))


# ----------------------------------------------------------------------------- tfds

CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@pytest.fixture(scope="module")
def tiny_cifar10():
  """Writes real `cifar10` TFDS datasets (array_record and tfrecord) into temporary data_dirs.

  The registered Cifar10 builder (same name, version, features and dataset_info) is subclassed only
  to generate a few random examples instead of downloading; TFDS's own writer produces the files.
  """
  import tempfile
  tfds = sources._import_tfds()
  from tensorflow_datasets.image_classification import cifar
  rng = np.random.default_rng(0)
  examples = {split: (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.permutation(np.arange(n) % 10))
              for split, n in (("train", 30), ("test", 12))}

  class TinyCifar10(cifar.Cifar10, skip_registration=True):
    name = "cifar10"

    def _split_generators(self, dl_manager):
      self.info.features["label"].names = list(CIFAR10_NAMES)
      return {split: self._generate_examples(split) for split in examples}

    def _generate_examples(self, split):  # pylint: disable=arguments-differ
      images, labels = examples[split]
      for i, (image, label) in enumerate(zip(images, labels)):
        yield i, {"id": f"{split}_{i}", "image": image, "label": int(label)}

  dirs = {}
  with tempfile.TemporaryDirectory() as root:
    for file_format in ("array_record", "tfrecord"):
      dirs[file_format] = os.path.join(root, file_format)
      TinyCifar10(data_dir=dirs[file_format], file_format=file_format).download_and_prepare()
    yield tfds, dirs, examples


def _check_round_trip(ds, examples):
  for split, (images, labels) in examples.items():
    by_pixels = {image.tobytes(): int(label) for image, label in zip(images, labels)}
    assert ds.num_examples(split) == len(images)
    read = ds.read(split, np.arange(len(images))[::-1])[::-1]
    got_labels = ds.labels(split)
    assert read.dtype == np.uint8 and read.shape == images.shape
    # TFDS stores examples in a shuffled order: match images by content, then labels.
    assert sorted(im.tobytes() for im in read) == sorted(by_pixels)
    assert all(by_pixels[im.tobytes()] == got_labels[i] for i, im in enumerate(read))


def test_tfds_array_record_round_trip(tiny_cifar10):
  tfds, dirs, examples = tiny_cifar10
  config = data_config(source="tfds", name="cifar10", tfds_data_dir=dirs["array_record"])
  ds = sources.open_dataset(config)
  assert isinstance(ds._readers["train"], sources._TfdsSplit)  # random access, not in memory
  assert ds.class_names == CIFAR10_NAMES and ds.image_size == 32 and ds.num_classes == 10
  assert (ds.mean, ds.std) == stats.PRESETS["cifar"]
  _check_round_trip(ds, examples)
  assert ds.fingerprint()["num_train"] == 30
  small = sources.open_dataset(data_config(source="tfds", name="cifar10", tfds_data_dir=dirs["array_record"],
                                           image_size=16, max_per_class=2, test_split="test[:5]"))
  assert small.read("train", np.arange(20)).shape == (20, 16, 16, 3)
  assert small.num_examples("test") == 5
  np.testing.assert_array_equal(np.bincount(small.labels("train")), [2] * 10)


def test_tfds_tfrecord_is_read_into_memory(tiny_cifar10, monkeypatch):
  _, dirs, examples = tiny_cifar10
  config = data_config(source="tfds", name="cifar10", tfds_data_dir=dirs["tfrecord"])
  _check_round_trip(sources.open_dataset(config), examples)
  from prism_jax.data import tfds_source
  monkeypatch.setattr(tfds_source, "_TFDS_IN_MEMORY_BYTES", 1000)
  with pytest.raises(ValueError, match=r"too large .*--file_format=array_record"):
    sources.open_dataset(config)


def test_tfds_errors(tiny_cifar10, tmp_path):
  _, dirs, _ = tiny_cifar10
  with pytest.raises(ValueError, match=r"data\.name='cifar100'.*not prepared.*nothing is downloaded.*tfds build"):
    sources.open_dataset(data_config(source="tfds", name="cifar100", tfds_data_dir=str(tmp_path)))
  with pytest.raises(ValueError, match=r"data\.name='cifar_ten'.*not a TFDS dataset.*close matches:.*cifar10"):
    sources.open_dataset(data_config(source="tfds", name="cifar_ten", tfds_data_dir=str(tmp_path)))
  with pytest.raises(ValueError, match=r"data\.test_split='validation'.*\['test', 'train'\]"):
    sources.open_dataset(data_config(source="tfds", name="cifar10", tfds_data_dir=dirs["array_record"],
                                     test_split="validation"))


# ----------------------------------------------------------------------------- stats and helpers

def test_normalize_denormalize_and_pixel_bounds():
  import jax
  import jax.numpy as jnp
  mean, std = stats.PRESETS["cifar"]
  images = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
  x = stats.normalize(images, mean, std)
  assert x.dtype == np.float32
  np.testing.assert_allclose(x[0, 0, 0], (images[0, 0, 0] / 255 - np.array(mean)) / np.array(std), rtol=1e-5)
  np.testing.assert_allclose(stats.denormalize(x, mean, std), images / 255, atol=1e-6)
  np.testing.assert_allclose(stats.normalize(images / 255.0, mean, std), x, atol=1e-6)  # float [0, 1] input
  jx = stats.normalize(jnp.asarray(images), mean, std)
  assert isinstance(jx, jax.Array) and np.allclose(np.asarray(jx), x, atol=1e-6)
  low, high = stats.pixel_bounds(mean, std)
  np.testing.assert_allclose(low, -np.array(mean) / np.array(std), rtol=1e-6)
  np.testing.assert_allclose(high, (1 - np.array(mean)) / np.array(std), rtol=1e-6)
  np.testing.assert_allclose(stats.normalize(np.array([0, 255], np.uint8)[:, None].repeat(3, 1), mean, std),
                             np.stack([low, high]), rtol=1e-6)
  with pytest.raises(ValueError, match="3 per-channel values"):
    stats.normalize(images, (0.5, 0.5), std)


def test_dataset_presets():
  assert stats.for_dataset("imagenet2012") == stats.PRESETS["imagenet"]
  assert stats.for_dataset("imagenette/320px-v2") == stats.PRESETS["imagenet"]
  assert stats.for_dataset("cifar10:3.0.2") == ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
  assert stats.for_dataset("cifar100") == stats.PRESETS["cifar"]
  assert stats.for_dataset("tiny_imagenet") == stats.PRESETS["tiny_imagenet"]
  assert stats.for_dataset("my_photos") is None


def test_resize_shorter_center_crop_matches_torchvision_sizes():
  image = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
  out = sources.resize_shorter_center_crop(image, int(224 / 0.875), 224)
  assert out.shape == (224, 224, 3)
  resized = np.asarray(Image.fromarray(image).resize((341, 256), Image.BILINEAR))  # 256 x int(256*400/300)
  np.testing.assert_array_equal(out, resized[16:240, 58:282])  # round((256-224)/2), round((341-224)/2)
  square = image[:224, :224]
  assert sources.resize_shorter_center_crop(square, 256, 224) is square


def test_epoch_permutation():
  a = sources.epoch_permutation(100, seed=3, epoch=2)
  np.testing.assert_array_equal(a, sources.epoch_permutation(100, 3, 2))
  np.testing.assert_array_equal(np.sort(a), np.arange(100))
  assert not np.array_equal(a, sources.epoch_permutation(100, 3, 3))
  assert not np.array_equal(a, sources.epoch_permutation(100, 4, 2))
