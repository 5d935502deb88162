"""The squeeze stage end to end through the CLI: accuracy, artifacts, resume after kill, bad input."""

import glob
import json
import os
import signal
import subprocess
import time

import flax.serialization
import jax
import numpy as np
import pytest

from cli_utils import REPO_ROOT, cli_command, cli_env, run_cli
from prism_jax.io import artifacts, teacher_store

# A short real training on digits: one narrow ResNet-18, 2 epochs of 22 steps.
TINY = ("--config.stage=squeeze", "--config.squeeze.teachers=('resnet18',)", "--config.squeeze.width=0.125", "--config.squeeze.epochs=2",
        "--config.squeeze.learning_rate=0.2", "--config.squeeze.eval_every_epochs=0",
        "--config.squeeze.checkpoint_every_steps=10",
        "--config.squeeze.log_every_steps=10", "--config.progress_interval_s=0")


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("squeeze"))
  result = run_cli("configs/quickstart.py", workdir, *TINY)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return workdir, result


def _variables(workdir):
  with open(os.path.join(workdir, "teachers", "resnet18", teacher_store.VARIABLES_FILE), "rb") as f:
    return flax.serialization.msgpack_restore(f.read())


def test_squeeze_cli_trains_a_teacher_better_than_chance(trained_workdir):
  workdir, result = trained_workdir
  meta = json.load(open(os.path.join(workdir, "teachers", "resnet18", "teacher.json")))
  assert meta["test_accuracy"] > 0.5  # 10 classes: chance is 0.1
  assert meta["class_names"] == [str(i) for i in range(10)]
  assert meta["model"] == {"name": "resnet18", "num_classes": 10, "stem": "small", "width": 0.125,
                           "image_size": 32}
  assert "test top-1" in result.stdout and "ETA" in result.stdout and "img/s" in result.stdout
  config = json.load(open(os.path.join(workdir, "config.json")))
  assert config["squeeze"]["width"] == 0.125 and config["stage"] == "squeeze"
  assert glob.glob(os.path.join(workdir, "tensorboard", "squeeze_resnet18", "events.out.tfevents.*"))
  # The checkpoint loads as a teacher with the right class order and shapes.
  model, variables, _ = teacher_store.load_teacher(os.path.join(workdir, "teachers", "resnet18"),
                                                   expected_class_names=[str(i) for i in range(10)])
  logits = model.apply(variables, np.zeros((2, 32, 32, 3), np.float32), train=False)
  assert logits.shape == (2, 10)


def _tiny_config(**squeeze_overrides):
  """The in-process equivalent of configs/quickstart.py + TINY."""
  from configs import quickstart
  config = quickstart.get_config()
  config.stage = "squeeze"
  config.squeeze.teachers = ("resnet18",)
  config.squeeze.width, config.squeeze.epochs, config.squeeze.learning_rate = 0.125, 2, 0.2
  config.squeeze.eval_every_epochs, config.squeeze.checkpoint_every_steps = 0.0, 10
  for k, v in squeeze_overrides.items():
    config.squeeze[k] = v
  return config


def test_rerun_is_a_noop_and_other_recipe_is_refused(trained_workdir, capsys):
  from prism_jax.parallel import mesh as mesh_lib
  from prism_jax.stages import squeeze
  workdir, _ = trained_workdir
  mesh = mesh_lib.make_mesh(2)
  accuracy = squeeze.run(_tiny_config(), workdir, mesh)["resnet18"]
  assert "already trained" in capsys.readouterr().out
  assert accuracy == json.load(open(os.path.join(workdir, "teachers", "resnet18", "teacher.json")))["test_accuracy"]
  with pytest.raises(artifacts.ArtifactError,
                     match="squeeze.learning_rate: this run has 0.1, the artifact has 0.2"):
    squeeze.run(_tiny_config(learning_rate=0.1), workdir, mesh)
  with pytest.raises(artifacts.ArtifactError, match="data.num_train"):
    other_data = _tiny_config()
    other_data.data.max_per_class = 20
    squeeze.run(other_data, workdir, mesh)


def test_teacher_for_other_class_order_is_refused(trained_workdir):
  workdir, _ = trained_workdir
  with pytest.raises(artifacts.ArtifactError, match="class count or order differs"):
    teacher_store.load_teacher(os.path.join(workdir, "teachers", "resnet18"),
                               expected_class_names=[str(i) for i in reversed(range(10))])


def test_corrupt_teacher_is_detected(trained_workdir, tmp_path):
  workdir, _ = trained_workdir
  src = os.path.join(workdir, "teachers", "resnet18")
  dst = tmp_path / "teacher"
  dst.mkdir()
  for f in os.listdir(src):
    if f != "ckpt":
      (dst / f).write_bytes(open(os.path.join(src, f), "rb").read())
  data = (dst / teacher_store.VARIABLES_FILE).read_bytes()
  (dst / teacher_store.VARIABLES_FILE).write_bytes(data[: len(data) // 2])
  with pytest.raises(artifacts.ArtifactError, match="checksum mismatch"):
    teacher_store.load_teacher(str(dst))


def test_a_teacher_whose_variables_fail_their_checksum_is_not_trusted(trained_workdir, tmp_path, capsys):
  import shutil
  from prism_jax.parallel import mesh as mesh_lib
  from prism_jax.stages import squeeze
  src, _ = trained_workdir
  workdir = str(tmp_path / "copy")
  shutil.copytree(os.path.join(src, "teachers"), os.path.join(workdir, "teachers"))
  path = os.path.join(workdir, "teachers", "resnet18", teacher_store.VARIABLES_FILE)
  want = open(path, "rb").read()
  data = bytearray(want)
  data[len(data) // 3] ^= 0x40  # one flipped bit: same size, wrong weights
  open(path, "wb").write(bytes(data))
  capsys.readouterr()
  squeeze.run(_tiny_config(), workdir, mesh_lib.make_mesh(2))
  out = capsys.readouterr().out
  assert "variables.msgpack fails its checksum" in out and "already trained" not in out
  # The finished run's last checkpoint is restored: the same teacher, written again.
  assert open(path, "rb").read() == want


def test_resume_after_kill_matches_uninterrupted_run(trained_workdir, tmp_path):
  reference_dir, _ = trained_workdir
  workdir = str(tmp_path / "killed")
  proc = subprocess.Popen(cli_command("configs/quickstart.py", workdir, *TINY), cwd=REPO_ROOT,
                          env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt_dir = os.path.join(workdir, "teachers", "resnet18", "ckpt")
  deadline = time.time() + 240
  while time.time() < deadline:
    steps = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(ckpt_dir) else []
    if steps and max(steps) >= 20:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not teacher_store.is_complete(os.path.join(workdir, "teachers", "resnet18")), "killed too late"
  resumed = run_cli("configs/quickstart.py", workdir, *TINY)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resuming from step" in resumed.stdout
  got, want = _variables(workdir), _variables(reference_dir)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_unknown_config_key_is_named(tmp_path):
  result = run_cli("configs/quickstart.py", str(tmp_path), "--config.squeeze.bogus_field=1")
  assert result.returncode != 0
  assert "bogus_field" in result.stderr


def test_cli_reports_bad_input_in_one_line(tmp_path):
  result = run_cli("configs/quickstart.py", str(tmp_path), "--config.stage=squeeze",
                   "--config.data.source=hdf5")
  assert result.returncode == 1
  assert "prism_jax: error: " in result.stderr and "data.source" in result.stderr and "hdf5" in result.stderr
  assert "Traceback" not in result.stderr
