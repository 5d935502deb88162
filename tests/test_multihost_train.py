"""Multi-process relabel and student training: 2 local JAX processes (2 CPU devices each) sharing
one work directory (as a bucket or a shared mount does on a pod) give the same soft labels and the
same student as one process with 4 devices; a finished run is a no-op on every process; processes
that do not share the work directory are stopped with a clear error. (Online soft labels feed the
student the same way; their teachers are placed on the devices as relabel's are.)

The processes are started through the CLI and talk through JAX's distributed runtime on a
localhost coordinator (gloo collectives on CPU). Each feeds only the batch rows of its own devices.
"""

import json
import os

import numpy as np
import pytest

import recover_utils as ru
from cli_utils import load_config, run_processes
from prism_jax.io import layout
from prism_jax.parallel import mesh as mesh_lib
from prism_jax.relabel import store
from prism_jax.stages import relabel, train

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

# 16 real images (4 per class), batch 8 in 2 micro-batches of 4 = one row per device per micro-batch
# on the 4-device mesh; 2 epochs of 2 steps, evaluated every epoch.
CONFIG_TEMPLATE = '''
"""Relabel and train on tiny arrays with tiny random teachers (written by tests/test_multihost_train.py)."""
import sys
sys.path.insert(0, {tests_dir!r})
import recover_utils  # noqa: F401  registers the tiny teachers in this process
from configs import common


def get_config():
  c = common.base_config()
  c.stage = "distill,relabel,train"
  c.data = common.data_config(source="arrays", name="tiny", path={data!r})
  c.recover.ipc = 4
  c.image_sets = ("random_real",)
  common.set_protocol(c, "prism")
  c.relabel.teachers, c.teachers_dir = ("tiny_a", "tiny_b"), {teachers!r}
  c.relabel.aggregation = "norm_rescaled_mean"
  tr = c.train
  tr.student, tr.width, tr.seeds = "tiny_a", 1.0, (0,)
  tr.epochs, tr.batch_size, tr.accumulation = 2, 8, 2
  tr.eval_every_epochs, tr.log_every_steps, tr.checkpoint_every_steps = 1.0, 1, 2
  c.progress_interval_s = 0.0
  return c
'''


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost_train")
  path = root / "tiny_train.py"
  path.write_text(CONFIG_TEMPLATE.format(tests_dir=TESTS_DIR, **ru.write_relabel_assets(str(root))))
  return {"stored": str(path)}


@pytest.fixture(scope="module")
def stored_runs(assets, tmp_path_factory):
  """The reference (one process, 4 of the test session's CPU devices) and the 2-process run."""
  root = tmp_path_factory.mktemp("multihost_train_stored")
  single, shared = str(root / "one_process"), str(root / "two_processes")
  config_path = assets["stored"]
  config = load_config(config_path)
  mesh = mesh_lib.make_mesh(4)
  ru.distill(config, single, mesh)
  relabel.run(config, single, mesh)
  train.run(config, single, mesh)
  outputs = run_processes(config_path, [shared, shared])
  return {"single": single, "multi": shared, "outputs": outputs, "config_path": config_path}


def _student(workdir: str) -> dict:
  return json.load(open(os.path.join(layout.student_dir(workdir, "random_real", 0), layout.STUDENT_FILE)))


def _assert_same_student(got: dict, want: dict) -> None:
  assert [h["step"] for h in got["history"]] == [h["step"] for h in want["history"]] == [2, 4]
  for g, w in zip(got["history"], want["history"]):
    assert g.keys() == w.keys()
    for key in g:  # eval loss and top-1 after each epoch: a different student would not match
      np.testing.assert_allclose(g[key], w[key], rtol=2e-5, atol=1e-6, err_msg=key)
  assert got["best_top1"] == pytest.approx(want["best_top1"], abs=1e-6)


def test_two_processes_relabel_and_train_like_one(stored_runs):
  out0, out1 = stored_runs["outputs"]
  assert "4 cpu device(s) in 2 process(es)" in out0
  assert "4 device(s)" in out1 and "[train random_real seed 0] best top-1" in out1
  # Soft labels: written once (by process 0), equal to the one-process run's.
  labels = {}
  for run in ("single", "multi"):
    directory = os.path.join(run_dir := stored_runs[run], "sets", "random_real", "relabel")
    index = store.read_index(directory)
    assert index["complete"] and sorted(index["shards"]) == [store.shard_name(0), store.shard_name(1)]
    labels[run] = [store.read_shard(directory, e, index) for e in (0, 1)]
    assert not [n for n in os.listdir(directory) if n.endswith(".tmp")], run_dir
  for got, want in zip(labels["multi"], labels["single"]):
    np.testing.assert_array_equal(got["indices"], want["indices"])
    np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-5, atol=1e-5)
  _assert_same_student(_student(stored_runs["multi"]), _student(stored_runs["single"]))
  ckpt = os.path.join(layout.student_dir(stored_runs["multi"], "random_real", 0), "ckpt")
  assert sorted(n for n in os.listdir(ckpt) if n.isdigit()) == ["2", "4"]


def test_finished_run_is_a_no_op_on_every_process(stored_runs):
  before = _student(stored_runs["multi"])
  outputs = run_processes(stored_runs["config_path"], [stored_runs["multi"]] * 2)
  for out in outputs:
    assert "[relabel random_real] already done" in out
    assert "[train random_real seed 0] already trained" in out
  assert _student(stored_runs["multi"]) == before


def test_stages_after_recover_refuse_unshared_work_directories(assets, tmp_path):
  # As on hosts with local disks only: process 1 cannot read what process 0 writes.
  outputs = run_processes(assets["stored"], [str(tmp_path / "host0"), str(tmp_path / "host1")], check=False)
  for out in outputs:
    assert "prism_jax: error: --workdir=" in out
    assert "process(es) [1] do not see the files process 0 writes there; the relabel stage" in out
  assert not os.path.exists(tmp_path / "host0" / "sets" / "random_real" / "relabel")
