"""Stages with a remote work directory and remote teachers give what they give on a local one.

TensorFlow's in-memory `ram://` file system stands in for a gs:// bucket (it lives in this process,
so the stages run in-process). Squeeze and train checkpoint through orbax, which cannot use ram://,
so recover, relabel and evaluate are compared here.
"""

import os
import uuid

import numpy as np
import pytest
from PIL import Image

import recover_utils as ru
from configs import common
from prism_jax.io import artifacts, fs
from prism_jax.parallel import mesh as mesh_lib
from prism_jax.io import layout
from prism_jax.stages import distill, evaluate, relabel


def make_config(data: str, teachers: str):
  c = common.base_config()
  c.data = common.data_config(source="arrays", name="tiny", path=data)
  c.teachers_dir = teachers
  rc = c.recover
  rc.ipc, rc.classes_per_batch = 2, 2
  rc.logit_teacher, rc.bn_pool = "tiny_a", ("tiny_b",)
  rc.distribution, rc.fixed_teachers, rc.k_max = "fixed", ("tiny_a", "tiny_b"), 2
  rc.iterations, rc.iteration_step, rc.iteration_period = 4, 0, 1
  rc.iterations_per_call, rc.checkpoint_every_iterations = 2, 2
  common.set_protocol(c, "prism")
  rl = c.relabel
  rl.teachers, rl.aggregation = ("tiny_a", "tiny_b"), "norm_rescaled_mean"
  c.train.epochs, c.train.batch_size = 2, 4
  c.evaluate.reference_model, c.evaluate.umap = "tiny_a", False
  c.progress_interval_s = 0.0
  return c


def run_stages(config, workdir: str) -> dict:
  mesh = mesh_lib.make_mesh(2)
  return {name: module.run(config, workdir, mesh)
          for name, module in (("recover", distill), ("relabel", relabel), ("evaluate", evaluate))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("remote_workdir")
  data = ru.write_tiny_arrays(str(root / "data"))
  bucket = f"ram://prism-{uuid.uuid4().hex[:12]}"
  out = {}
  for kind, base in (("local", str(root)), ("remote", bucket)):
    teachers = ru.write_random_teachers(os.path.join(base, "teachers"))
    workdir = os.path.join(base, "run")
    config = make_config(data, teachers)
    out[kind] = {"workdir": workdir, "config": config, "results": run_stages(config, workdir)}
  return out


def _npz(path: str) -> dict:
  with fs.open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


def test_remote_run_writes_the_same_artifacts(runs):
  local, remote = runs["local"]["workdir"], runs["remote"]["workdir"]
  assert remote.startswith("ram://")
  want, got = (_npz(os.path.join(w, "recover", "images.npz")) for w in (local, remote))
  assert sorted(got) == sorted(want) == ["class_names", "images", "ipc_index", "labels"]
  assert got["images"].shape == (8, ru.IMAGE_SIZE, ru.IMAGE_SIZE, 3)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key])
  for name in ("recover.json", "manifest.jsonl", "classes.json", "run.json"):
    assert fs.exists(os.path.join(remote, "recover", name)), name
  with fs.open(os.path.join(remote, "recover", "images", "0002_cat", "ipc0001.png"), "rb") as f:
    np.testing.assert_array_equal(np.asarray(Image.open(f)), got["images"][2 + 4])  # lossless
  assert fs.listdir(os.path.join(remote, "recover", "images", "0002_cat")) == ["ipc0000.png", "ipc0001.png"]
  # Mid-wave checkpoints were written and removed once each wave finished.
  waves = fs.listdir(os.path.join(remote, "recover", "waves"))
  assert waves and not [n for n in waves if ".partial" in n]
  # Soft labels: identical shards (checksums) and index.
  labels = [runs[k]["results"]["relabel"]["recover"] for k in ("local", "remote")]
  assert labels[1]["complete"] and labels[1]["shards"] == labels[0]["shards"]
  assert len(labels[1]["shards"]) == 2
  # Evaluation: the same diversity numbers, and the report with a relative picture link.
  rows = [runs[k]["results"]["evaluate"]["rows"][0] for k in ("local", "remote")]
  assert rows[1]["intra_cos"] == pytest.approx(rows[0]["intra_cos"], abs=1e-6)
  assert rows[1]["inter_cos"] == pytest.approx(rows[0]["inter_cos"], abs=1e-6)
  with fs.open(os.path.join(remote, "evaluate", "report.md"), "r") as f:
    assert "![Images per class, methods side by side](grid.png)" in f.read()
  assert artifacts.read_json(os.path.join(remote, "evaluate", "results.json"))["rows"][0]["images"] == 8
  assert [n for n in fs.listdir(os.path.join(remote, "tensorboard", "recover")) if n.startswith("events.")]


def test_remote_rerun_resumes_without_recomputing(runs, capsys):
  remote, config = runs["remote"]["workdir"], runs["remote"]["config"]
  images = os.path.join(remote, "recover", "images.npz")
  before = artifacts.sha256_file(images)
  mesh = mesh_lib.make_mesh(2)
  capsys.readouterr()
  assert ru.run_recover(config, remote, mesh)["num_images"] == 8
  assert relabel.run(config, remote, mesh)["recover"]["complete"]
  out = capsys.readouterr().out
  assert "[recover] already done: 8 images" in out and "[relabel recover] already done" in out
  # Without the completion marker, the finished wave files are reused: no iteration runs and the
  # same set is exported again.
  fs.remove(layout.distilled_marker(remote, "recover"))
  ru.run_recover(config, remote, mesh)
  out = capsys.readouterr().out
  assert "[recover] 8 images" in out and "wave-iteration" not in out
  assert artifacts.sha256_file(images) == before



MAIN_CONFIG = '''
"""Recover on tiny data (written by tests/test_remote_workdir.py)."""
import test_remote_workdir


def get_config():
  c = test_remote_workdir.make_config({data!r}, {teachers!r})
  c.stage = "recover"
  return c
'''


def test_main_takes_a_remote_work_directory(runs, tmp_path, capsys):
  """prism_jax.main in this process (ram:// lives in one process) with --workdir=ram://..."""
  from absl import flags
  from prism_jax import main as main_module
  local = runs["local"]["config"]
  config = tmp_path / "remote_main.py"
  config.write_text(MAIN_CONFIG.format(data=local.data.path, teachers=local.teachers_dir))
  workdir = f"ram://prism-main-{uuid.uuid4().hex[:12]}/run"
  flags.FLAGS([ "prism_jax.main", f"--config={config}", f"--workdir={workdir}"])
  try:
    main_module.main(["prism_jax.main"])
  finally:
    flags.FLAGS.unparse_flags()
  out = capsys.readouterr().out
  assert f"workdir {workdir}" in out and f"[recover] 8 images -> {workdir}/recover" in out
  assert artifacts.read_json(os.path.join(workdir, "config.json"))["stage"] == "recover"
  np.testing.assert_array_equal(_npz(os.path.join(workdir, "recover", "images.npz"))["images"],
                                _npz(os.path.join(runs["local"]["workdir"], "recover", "images.npz"))["images"])
