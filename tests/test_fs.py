"""io/fs.py and the artifact helpers on a local directory and on a remote URL.

TensorFlow's in-memory `ram://` file system stands in for a gs:// bucket: the remote branch of
every helper goes through tf.io.gfile, as it does for gs://.
"""

import glob
import os
import tempfile
import uuid

import jax
import numpy as np
import pytest
from PIL import Image

import recover_utils as ru
from configs import common
from prism_jax import models
from prism_jax.data import sources
from prism_jax.io import artifacts, checkpoint, fs, monitoring, teacher_store


def ram_dir() -> str:
  return f"ram://prism-{uuid.uuid4().hex[:12]}"  # ram:// lives as long as the process: keep tests apart


@pytest.fixture(params=["local", "remote"])
def root(request, tmp_path):
  return str(tmp_path / "w") if request.param == "local" else ram_dir() + "/w"


def test_json_npz_and_bytes_round_trip(root):
  obj = {"lr": 0.1, "teachers": ("a", "b"), "sizes": np.arange(3), "seed": np.int64(7), "nested": {"x": None}}
  artifacts.write_json(os.path.join(root, "meta", "a.json"), obj)
  assert artifacts.read_json(os.path.join(root, "meta", "a.json")) == {
      "lr": 0.1, "teachers": ["a", "b"], "sizes": [0, 1, 2], "seed": 7, "nested": {"x": None}}
  images = np.random.default_rng(0).integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
  weights = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
  npz = os.path.join(root, "arrays.npz")
  artifacts.write_npz(npz, images=images, weights=weights, names=np.asarray(["ant", "bee"]))
  with fs.open(npz, "rb") as f, np.load(f, allow_pickle=False) as z:
    np.testing.assert_array_equal(z["images"], images)
    np.testing.assert_array_equal(z["weights"], weights)
    assert list(z["names"]) == ["ant", "bee"]
  data = bytes(range(256)) * 10
  artifacts.write_bytes(os.path.join(root, "blob.bin"), data)
  assert artifacts.sha256_file(os.path.join(root, "blob.bin")) == artifacts.sha256_bytes(data)
  with fs.open(os.path.join(root, "blob.bin"), "rb") as f:
    assert f.read() == data
  # Rewriting replaces the content.
  artifacts.write_json(os.path.join(root, "meta", "a.json"), {"x": 2})
  assert artifacts.read_json(os.path.join(root, "meta", "a.json")) == {"x": 2}


def test_exists_isdir_listdir_remove(root):
  fs.makedirs(os.path.join(root, "sub", "deeper"))
  fs.makedirs(os.path.join(root, "sub", "deeper"))  # an existing directory is fine
  artifacts.write_bytes(os.path.join(root, "sub", "f.txt"), b"x")
  with fs.open(os.path.join(root, "sub", "g.txt"), "w") as f:
    f.write("héllo\n")
  with fs.open(os.path.join(root, "sub", "g.txt"), "r") as f:
    assert f.read() == "héllo\n"
  assert fs.listdir(root) == ["sub"]
  assert fs.listdir(os.path.join(root, "sub")) == ["deeper", "f.txt", "g.txt"]
  assert fs.isdir(os.path.join(root, "sub", "deeper")) and not fs.isdir(os.path.join(root, "sub", "f.txt"))
  assert fs.exists(os.path.join(root, "sub", "f.txt")) and not fs.exists(os.path.join(root, "sub", "nope"))
  fs.remove(os.path.join(root, "sub", "f.txt"))
  assert not fs.exists(os.path.join(root, "sub", "f.txt"))
  assert fs.listdir(os.path.join(root, "sub")) == ["deeper", "g.txt"]
  with pytest.raises(FileNotFoundError):
    fs.open(os.path.join(root, "sub", "f.txt"), "rb").read()


def _staged_files(path: str) -> list[str]:
  return glob.glob(os.path.join(tempfile.gettempdir(), "." + os.path.basename(path) + ".*.tmp"))


def test_atomic_writes_leave_no_temporary_file(root):
  path = os.path.join(root, f"out-{uuid.uuid4().hex[:8]}.bin")
  artifacts.write_bytes(path, b"complete")
  assert fs.listdir(root) == [os.path.basename(path)]
  assert _staged_files(path) == []
  # A writer that fails leaves the previous content and no temporary file, locally or staged.
  with pytest.raises(RuntimeError):
    with artifacts.atomic_path(path) as tmp:
      with open(tmp, "wb") as f:
        f.write(b"partial")
      raise RuntimeError("killed")
  with fs.open(path, "rb") as f:
    assert f.read() == b"complete"
  assert fs.listdir(root) == [os.path.basename(path)]
  assert _staged_files(path) == []


def test_missing_and_corrupt_remote_json_are_named():
  missing = ram_dir() + "/w/recover.json"
  with pytest.raises(artifacts.ArtifactError, match=f"{missing}: file not found"):
    artifacts.read_json(missing)
  bad = ram_dir() + "/bad.json"
  artifacts.write_bytes(bad, b'{"a": ')
  with pytest.raises(artifacts.ArtifactError, match=f"{bad}: not valid JSON"):
    artifacts.read_json(bad)


def test_paths_and_links():
  assert fs.is_remote("gs://b/run") and not fs.is_remote("/tmp/run")
  assert fs.abspath("gs://b/run") == "gs://b/run"
  assert fs.abspath("run") == os.path.join(os.getcwd(), "run")
  assert fs.relpath("gs://b/run/evaluate/grid.png", "gs://b/run/evaluate") == "grid.png"
  assert fs.relpath("gs://b/other/evaluate/umap.png", "gs://b/run/evaluate") == "../../other/evaluate/umap.png"
  assert fs.relpath("gs://c/run/grid.png", "gs://b/run") == "gs://c/run/grid.png"  # another bucket
  assert fs.relpath("/data/x.png", "gs://b/run") == "/data/x.png"
  assert fs.relpath("/data/run/eval/x.png", "/data/run") == "eval/x.png"


def test_teacher_store_round_trip_on_remote_directory():
  teachers = ram_dir() + "/teachers"
  model = models.create_model("tiny_a", num_classes=4, stem="small", width=0.125)
  variables = models.random_variables(model, (2, ru.IMAGE_SIZE, ru.IMAGE_SIZE, 3), seed=3)
  path = os.path.join(teachers, "tiny_a")
  assert not teacher_store.is_complete(path)
  teacher_store.save_teacher(path, name="tiny_a", variables=variables,
                             model_config=dict(name="tiny_a", num_classes=4, stem="small", width=0.125,
                                               image_size=ru.IMAGE_SIZE),
                             class_names=ru.CLASS_NAMES, dataset={"name": "tiny"}, test_accuracy=0.5)
  assert teacher_store.is_complete(path)
  assert fs.listdir(path) == [teacher_store.META_FILE, teacher_store.VARIABLES_FILE]
  _, loaded, meta = teacher_store.load_teacher(path, expected_class_names=ru.CLASS_NAMES)
  assert meta["test_accuracy"] == 0.5 and meta["class_names"] == list(ru.CLASS_NAMES)
  want, got = jax.tree_util.tree_leaves_with_path(variables), jax.tree_util.tree_leaves_with_path(loaded)
  assert [p for p, _ in want] == [p for p, _ in got]
  for (_, a), (_, b) in zip(want, got):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(artifacts.ArtifactError, match="class count or order differs"):
    teacher_store.load_teacher(path, expected_class_names=tuple(reversed(ru.CLASS_NAMES)))


def test_orbax_checkpoints_refuse_schemes_orbax_cannot_use(tmp_path):
  directory = ram_dir() + "/teachers/resnet18/ckpt"
  with pytest.raises(ValueError, match=f"{directory}: orbax checkpoints need a local or gs:// directory, "
                                       "not ram://"):
    checkpoint.create_manager(directory, save_every_steps=1, keep=1)
  from etils.epath import gpath
  assert set(checkpoint.ORBAX_SCHEMES) == set(gpath._URI_SCHEMES)  # kept in step with etils
  manager = checkpoint.create_manager(str(tmp_path / "ckpt"), save_every_steps=1, keep=1)
  assert manager.directory.is_absolute()
  manager.close()


def test_tensorboard_writer_on_remote_directory():
  logdir = ram_dir() + "/tensorboard/recover"
  writer = monitoring.create_writer(logdir)
  writer.write_scalars(1, {"recover/ce": 0.5})
  writer.flush()
  writer.close()
  assert [n for n in fs.listdir(logdir) if n.startswith("events.out.tfevents.")]


def test_arrays_and_imagefolder_sources_read_remote_directories(tmp_path):
  local = ru.write_tiny_arrays(str(tmp_path / "arrays"))
  remote = ram_dir() + "/arrays"
  for split in ("train", "test"):
    with open(os.path.join(local, f"{split}.npz"), "rb") as f:
      artifacts.write_bytes(os.path.join(remote, f"{split}.npz"), f.read())
  datasets = [sources.open_dataset(common.data_config(source="arrays", name="tiny", path=p))
              for p in (local, remote)]
  assert tuple(datasets[0].class_names) == tuple(datasets[1].class_names) == ru.CLASS_NAMES
  rows = np.arange(len(datasets[0].labels("train")))
  np.testing.assert_array_equal(datasets[1].read("train", rows), datasets[0].read("train", rows))
  np.testing.assert_array_equal(datasets[1].labels("test"), datasets[0].labels("test"))

  folder = ram_dir() + "/folder"
  rng = np.random.default_rng(1)
  pixels = {}
  for split in ("train", "test"):
    for name in ("cat", "dog"):
      pixels[split, name] = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
      path = os.path.join(folder, split, name, "0.png")
      with artifacts.atomic_path(path) as tmp:
        Image.fromarray(pixels[split, name]).save(tmp, format="PNG")
  images = sources.open_dataset(common.data_config(source="imagefolder", name="pets", path=folder))
  assert list(images.class_names) == ["cat", "dog"]
  np.testing.assert_array_equal(images.read("test", np.arange(2)),
                                np.stack([pixels["test", "cat"], pixels["test", "dog"]]))

