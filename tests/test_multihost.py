"""Multi-process recovery: 2 local JAX processes (2 CPU devices each) form one 4-device mesh and
give the same recovered set as one process with 4 devices; resume per process; TensorBoard images.

The processes are started through the CLI as on multi-host GPU VMs and talk through JAX's
distributed runtime on a localhost coordinator (gloo collectives on CPU).
"""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

import recover_utils as ru
from cli_utils import load_config, run_processes
from prism_jax.parallel import mesh as mesh_lib


TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

# 4 classes x IPC 3 in chunks of 2 = 6 units on a 4-wide mesh: wave 0 holds the four T=6 units,
# wave 1 the two T=4 units (rows 2-3 are padding: process 1 holds no real unit there).
CONFIG_TEMPLATE = '''
"""Recover on tiny arrays with tiny random teachers (written by tests/test_multihost.py)."""
import sys
sys.path.insert(0, {tests_dir!r})
import recover_utils  # noqa: F401  registers the tiny teachers in this process
from configs import common


def get_config():
  c = common.base_config()
  c.stage = "recover"
  c.data = common.data_config(source="arrays", name="tiny", path={data!r})
  c.teachers_dir = {teachers!r}
  rc = c.recover
  rc.ipc, rc.classes_per_batch = 3, 2
  rc.logit_teacher, rc.bn_pool = "tiny_a", ("tiny_b",)
  rc.distribution, rc.fixed_teachers, rc.k_max = "fixed", ("tiny_a", "tiny_b"), 2
  rc.iterations, rc.iteration_step, rc.iteration_period = 6, 2, 2
  rc.iterations_per_call = 3
  rc.checkpoint_every_iterations = 3
  c.progress_interval_s = 0.0
  return c
'''


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost")
  data = ru.write_tiny_arrays(str(root / "data"))
  teachers = str(root / "teachers")
  for name in ("tiny_a", "tiny_b"):
    ru.write_random_teacher(teachers, name)
  path = root / "tiny_recover.py"
  path.write_text(CONFIG_TEMPLATE.format(tests_dir=TESTS_DIR, data=data, teachers=teachers))
  return str(path)


@pytest.fixture(scope="module")
def runs(config_path, tmp_path_factory):
  """The reference: one process, 4 of the test session's CPU devices. The two processes get one
  work directory each, as on hosts without a shared filesystem: process 0 must still export all."""
  root = tmp_path_factory.mktemp("multihost_runs")
  single, main, other = str(root / "one_process"), str(root / "process0"), str(root / "process1")
  ru.run_recover(load_config(config_path), single, mesh_lib.make_mesh(4))
  outputs = run_processes(config_path, [main, other])
  return {"single": single, "multi": main, "other": other, "outputs": outputs}


def _exported(workdir: str) -> dict:
  with np.load(os.path.join(workdir, "recover", "images.npz")) as f:
    return {k: f[k] for k in f.files}


def test_two_processes_form_one_mesh_and_match_one_process(runs):
  assert "4 cpu device(s) in 2 process(es)" in runs["outputs"][0]
  # Each process wrote only its rows of each wave, in its own work directory.
  for workdir, proc in ((runs["multi"], 0), (runs["other"], 1)):
    assert sorted(os.listdir(os.path.join(workdir, "recover", "waves"))) == [
        f"wave00000.p{proc}.npz", f"wave00001.p{proc}.npz"]
  assert not os.path.exists(os.path.join(runs["other"], "recover", "images.npz"))
  got, want = _exported(runs["multi"]), _exported(runs["single"])
  assert got["images"].shape == (12, ru.IMAGE_SIZE, ru.IMAGE_SIZE, 3)
  for key in ("images", "labels", "ipc_index", "class_names"):
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  # Every unit, including those only process 1 ran, is in process 0's export and manifest.
  manifest = [json.loads(l) for l in open(os.path.join(runs["multi"], "recover", "manifest.jsonl"))]
  reference = [json.loads(l) for l in open(os.path.join(runs["single"], "recover", "manifest.jsonl"))]
  assert [(m["ipc_index"], m["class"]) for m in manifest] == [(i, c) for i in range(3) for c in range(4)]
  np.testing.assert_allclose([m["final_bn"] for m in manifest], [m["final_bn"] for m in reference], rtol=1e-6)
  for image, label, ipc in zip(got["images"], got["labels"], got["ipc_index"]):
    png = os.path.join(runs["multi"], "recover", "images", f"{label:04d}_{ru.CLASS_NAMES[label]}",
                       f"ipc{ipc:04d}.png")
    np.testing.assert_array_equal(np.asarray(Image.open(png)), image)
  assert json.load(open(os.path.join(runs["multi"], "recover", "recover.json")))["num_images"] == 12


def test_each_process_resumes_from_its_own_wave_files(runs, config_path):
  out = os.path.join(runs["multi"], "recover")
  want = _exported(runs["multi"])["images"]
  # Process 1 lost its rows of wave 0 (and the export never happened); process 0 lost nothing.
  os.remove(os.path.join(runs["other"], "recover", "waves", "wave00000.p1.npz"))
  for name in ("recover.json", "images.npz"):
    os.remove(os.path.join(out, name))
  kept = os.path.join(out, "waves", "wave00000.p0.npz")
  kept_mtime = os.path.getmtime(kept)
  run_processes(config_path, [runs["multi"], runs["other"]])
  assert os.path.getmtime(kept) == kept_mtime  # process 0 reused its finished wave
  assert os.path.exists(os.path.join(runs["other"], "recover", "waves", "wave00000.p1.npz"))
  np.testing.assert_array_equal(_exported(runs["multi"])["images"], want)
  # A finished run is a no-op on every process (process 0's marker decides, also for process 1,
  # whose work directory has none).
  outputs = run_processes(config_path, [runs["multi"], runs["other"]])
  assert all("[recover] already done" in o for o in outputs)


def _image_summaries(logdir: str) -> list[tuple[int, np.ndarray]]:
  """(step, images (N, H, W, 3) uint8) of every `recover/images` summary in `logdir`."""
  acc = event_accumulator.EventAccumulator(logdir, size_guidance={event_accumulator.TENSORS: 0})
  acc.Reload()
  out = []
  for event in acc.Tensors("recover/images"):
    # tf.summary.image stores [width, height, png, png, ...] as a string tensor.
    encoded = tensor_util.make_ndarray(event.tensor_proto)
    images = np.stack([np.asarray(Image.open(io.BytesIO(png))) for png in encoded[2:]])
    out.append((event.step, images))
  return out


@pytest.mark.parametrize("run", ["single", "multi"])
def test_recovery_writes_image_summaries_from_process_zero(runs, run):
  logdir = os.path.join(runs[run], "tensorboard", "recover")
  events = [n for n in os.listdir(logdir) if n.startswith("events.out.tfevents")]
  summaries = _image_summaries(logdir)
  # One summary per wave, at the wave's last wave-iteration (6, then 6 + 4); the resume test may
  # have rerun the multi-process recovery (one more event file from process 0, same images).
  assert not os.path.exists(os.path.join(runs["other"], "tensorboard"))
  if run == "single":
    assert len(events) == 1 and [step for step, _ in summaries] == [6, 10]
  else:  # process 1 writes no event file of its own
    assert 1 <= len(events) <= 2 and {step for step, _ in summaries} == {6, 10}
  exported = _exported(runs[run])
  first_unit_ipc = {6: 0, 10: 1}  # the waves start with units (ipc 0, chunk 0) and (ipc 1, chunk 0)
  for step, images in summaries:
    assert images.shape == (2, ru.IMAGE_SIZE, ru.IMAGE_SIZE, 3) and images.dtype == np.uint8
    rows = (exported["ipc_index"] == first_unit_ipc[step]) & (exported["labels"] < 2)
    np.testing.assert_array_equal(images, exported["images"][rows])
