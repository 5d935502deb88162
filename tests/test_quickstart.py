"""The quickstart config, shortened, through the CLI: every stage on digits, ending in a report."""

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
  result = run_cli("configs/quickstart.py", workdir, *SHORT, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
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
  assert rows["recover"]["recover_s"] > 0 and rows["random_real"]["recover_s"] is None
  report = open(os.path.join(workdir, "evaluate", "report.md")).read()
  assert "| recover | 20 |" in report and "![Images per class, methods side by side](grid.png)" in report
  assert Image.open(os.path.join(workdir, "evaluate", "grid.png")).size[0] > 64
  # The results table is printed at the end, with the report's path.
  assert out.rstrip().splitlines()[-1].endswith(os.path.join("evaluate", "report.md"))
  assert "random_real" in out.split("[evaluate]")[0].splitlines()[-1]


def test_stage_with_missing_inputs_names_the_stage_to_run(tmp_path):
  result = run_cli("configs/quickstart.py", str(tmp_path / "empty"), "--config.stage=train", timeout=300)
  assert result.returncode == 1
  assert "run the relabel stage first" in result.stderr or "run the recover stage first" in result.stderr
