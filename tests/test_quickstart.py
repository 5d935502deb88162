"""The quickstart config, shortened, through the CLI: every stage on digits, ending in a report.

It runs with TensorFlow, TFDS and clu hidden from the import system (as on the GPU machines of
benchmarks/device_check.sh): local data and a local work directory need none of them, and the
TensorBoard logs are still written.
"""

import glob
import json
import os

from PIL import Image

from cli_utils import run_cli

SHORT = (
    "--config.squeeze.teachers=('resnet18',)", "--config.squeeze.width=0.125", "--config.squeeze.epochs=1",
    "--config.recover.distribution=single", "--config.recover.ipc=2", "--config.recover.iterations=8",
    "--config.recover.iteration_step=2", "--config.recover.iterations_per_call=4",
    "--config.relabel.teachers=('resnet18',)", "--config.train.width=0.125", "--config.train.epochs=2",
    "--config.train.batch_size=10", "--config.train.eval_every_epochs=1", "--config.evaluate.umap=False",
    "--config.progress_interval_s=0",
)


def test_quickstart_runs_every_stage_and_writes_the_report(tmp_path):
  workdir = str(tmp_path / "qs")
  result = run_cli("configs/quickstart.py", workdir, *SHORT, timeout=600,
                   hide_modules=("tensorflow", "tensorflow_datasets", "clu"))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "warning" not in result.stderr.lower(), result.stderr[-3000:]
  out = result.stdout
  for marker in ("[squeeze resnet18] test top-1", "[recover] 20 images", "[relabel recover]",
                 "[relabel random_real]", "[train recover seed 0] best top-1", "[evaluate] report:"):
    assert marker in out, marker
  results = json.load(open(os.path.join(workdir, "evaluate", "results.json")))
  rows = {r["method"]: r for r in results["rows"]}
  assert set(rows) == {"recover", "random_real"}
  for row in rows.values():
    assert row["images"] == 20
    assert 0.0 <= row["top1_best"]["mean"] <= 100.0 and row["top1_best"]["mean"] >= row["top1_last"]["mean"]
    assert -1.0 <= row["inter_cos"] <= row["intra_cos"] + 1.0 and row["intra_cos"] <= 1.0 + 1e-6
    assert row["relabel_s"] > 0 and row["train_s"] > 0
  assert rows["recover"]["distill_s"] > 0 and rows["recover"]["distill_img_it_s"] > 0
  assert rows["random_real"]["distill_s"] > 0 and rows["random_real"]["distill_img_it_s"] is None  # no iterations
  report = open(os.path.join(workdir, "evaluate", "report.md")).read()
  assert "| recover | 20 |" in report and "![Images per class, methods side by side](grid.png)" in report
  assert Image.open(os.path.join(workdir, "evaluate", "grid.png")).size[0] > 64
  # The results table is printed at the end, with the report's path, then what compilation cost.
  last_lines = out.rstrip().splitlines()[-2:]
  assert last_lines[0].endswith(os.path.join("evaluate", "report.md")), last_lines
  assert last_lines[1].startswith("[prism_jax] compilation: "), last_lines
  assert "random_real" in out.split("[evaluate]")[0].splitlines()[-1]
  # TensorBoard logs written without TensorFlow, readable by TensorBoard's own reader.
  from tensorboard.backend.event_processing import event_accumulator
  runs = sorted(os.path.basename(d) for d in glob.glob(os.path.join(workdir, "tensorboard", "*")))
  assert runs == ["recover", "relabel_random_real", "relabel_recover", "squeeze_resnet18",
                  "train_random_real_seed0", "train_recover_seed0"], runs
  acc = event_accumulator.EventAccumulator(os.path.join(workdir, "tensorboard", "train_recover_seed0"))
  acc.Reload()
  losses = acc.Scalars("train/loss")
  assert len(losses) >= 1 and all(e.value > 0 for e in losses)
  assert [e.step for e in acc.Scalars("eval/top1")] == sorted(e.step for e in acc.Scalars("eval/top1"))
  acc = event_accumulator.EventAccumulator(os.path.join(workdir, "tensorboard", "recover"))
  acc.Reload()
  assert "recover/images" in acc.Tags()["tensors"] and acc.Scalars("recover/ce")


def test_stage_with_missing_inputs_names_the_stage_to_run(tmp_path):
  result = run_cli("configs/quickstart.py", str(tmp_path / "empty"), "--config.stage=train", timeout=300)
  assert result.returncode == 1
  assert "run the distill stage first" in result.stderr
