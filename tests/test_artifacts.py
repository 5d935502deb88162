"""Atomic writes, config comparison and teacher checkpoint validation."""

import json
import os

import numpy as np
import pytest

from prism_jax.io import artifacts


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
  path = tmp_path / "out.bin"
  with pytest.raises(RuntimeError):
    with artifacts.atomic_path(str(path)) as tmp:
      with open(tmp, "wb") as f:
        f.write(b"partial")
      raise RuntimeError("killed")
  assert not path.exists()
  assert os.listdir(tmp_path) == []


def test_atomic_write_replaces_existing(tmp_path):
  path = str(tmp_path / "a.json")
  artifacts.write_json(path, {"x": 1})
  artifacts.write_json(path, {"x": (1, 2), "arr": np.arange(2)})
  assert json.load(open(path)) == {"x": [1, 2], "arr": [0, 1]}
  assert sorted(os.listdir(tmp_path)) == ["a.json"]


def test_artifacts_get_the_umask_mode_not_0600(tmp_path):
  # mkstemp creates 0600 files; an artifact must be readable like any other file the user writes.
  path = str(tmp_path / "a.json")
  artifacts.write_json(path, {"x": 1})
  umask = os.umask(0o022)
  os.umask(umask)
  assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


def test_read_json_reports_corrupt_file(tmp_path):
  path = tmp_path / "bad.json"
  path.write_text('{"a": ')
  with pytest.raises(artifacts.ArtifactError, match="bad.json: not valid JSON"):
    artifacts.read_json(str(path))
  with pytest.raises(artifacts.ArtifactError, match="missing.json: file not found"):
    artifacts.read_json(str(tmp_path / "missing.json"))


def test_check_same_names_every_differing_field():
  expected = {"squeeze": {"learning_rate": 0.1, "epochs": 3}, "seed": 0}
  found = {"squeeze": {"learning_rate": 0.2, "epochs": 3}, "seed": 1}
  with pytest.raises(artifacts.ArtifactError) as err:
    artifacts.check_same("teacher", "/w/teacher.json", expected, found)
  msg = str(err.value)
  assert "squeeze.learning_rate: this run has 0.1, the artifact has 0.2" in msg
  assert "seed: this run has 0, the artifact has 1" in msg
  assert "epochs" not in msg
  artifacts.check_same("teacher", "/w/teacher.json", expected, json.loads(json.dumps(expected)))
