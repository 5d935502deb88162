"""benchmarks/device_check.py --smoke: every part of the accelerator check runs on CPU at tiny sizes
and writes the JSON the README's GPU table is made from."""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import device_check  # noqa: E402


def test_smoke_runs_every_part_and_writes_json(tmp_path):
  out = str(tmp_path / "device_check.json")
  device_check.main(["--smoke", "--out", out, "--cache", str(tmp_path / "cache"), "--devices", "1"])
  result = json.load(open(out))
  assert result["smoke"] is True and result["backend"] == "cpu"
  recover = result["recover"]
  assert {(r["K"], r["gating"]) for r in recover} == {(1, "cond"), (1, "static")}
  for row in recover:
    assert row["image_iterations_per_s"] > 0 and row["flops_per_iteration"] > 0
    assert row["xla_temp_bytes"] > 0 and row["mfu"] is None  # CPU: no known peak
  train = {r["compute_dtype"]: r for r in result["train"]}
  assert set(train) == {"float32", "bfloat16"}
  for row in train.values():
    assert row["steps_per_s"] > 0 and row["param_dtypes"] == ["float32"] and np.isfinite(row["final_loss"])
  header, *rows = result["quality"]
  assert set(header["teacher_test_top1"]) == {"resnet18", "alexnet"}
  assert [(r["ipc"], r["method"]) for r in rows] == [(1, "random_real"), (1, "prism")]
  for row in rows:
    assert 0.0 <= row["top1_best"]["mean"] <= 1.0 and row["train_s"] > 0
  assert rows[0]["distill_s"] > 0 and rows[1]["distill_s"] > rows[0]["distill_s"]  # recovery vs a draw


def test_peak_flops_by_device_kind():
  class Device:
    device_kind = "NVIDIA H200"
  assert device_check.peak_flops(Device(), 0.0, "bfloat16") == 989e12
  assert device_check.peak_flops(Device(), 0.0, "float32") == 67e12
  assert device_check.peak_flops(Device(), 100.0, "float32") == 100e12
  Device.device_kind = "cpu"
  assert device_check.peak_flops(Device(), 0.0, "float32") is None
