"""Squeeze benchmark: ResNet-18 (small stem) on real CIFAR-10 arrays; images/s and test accuracy.

  python benchmarks/squeeze.py --data /path/to/cifar10 --epochs 1 --width 0.25 \
      --out bench_out/squeeze.json

Runs the real squeeze stage (same code path as the CLI) in a scratch work directory and reports
the steady-state training throughput (compiling first step excluded, evaluation and checkpoint
saves excluded), the wall time, and the final test top-1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data", required=True, help="directory with train.npz / test.npz (CIFAR-10)")
  parser.add_argument("--epochs", type=float, default=1.0)
  parser.add_argument("--width", type=float, default=0.25)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--lr", type=float, default=0.1)
  parser.add_argument("--max-per-class", type=int, default=0, help="0: the whole training split")
  parser.add_argument("--devices", type=int, default=-1)
  parser.add_argument("--workdir", default="", help="default: a temporary directory")
  parser.add_argument("--out", default="bench_out/squeeze.json")
  args = parser.parse_args()

  import jax
  from prism_jax import runtime
  runtime.configure_jax()
  from configs import common
  from prism_jax.io import teacher_store
  from prism_jax.parallel import mesh as mesh_lib
  from prism_jax.stages import squeeze

  config = common.base_config()
  config.stage = "squeeze"
  config.data = common.data_config(source="arrays", name="cifar10", path=os.path.abspath(args.data))
  config.data.max_per_class = args.max_per_class
  sq = config.squeeze
  sq.teachers, sq.width, sq.epochs, sq.batch_size, sq.learning_rate = ("resnet18",), args.width, args.epochs, args.batch, args.lr
  sq.warmup_epochs = min(1.0, args.epochs / 4)
  sq.eval_every_epochs = 0.0
  sq.eval_batch_size = 500
  sq.checkpoint_every_steps = 10**9  # only the final save: measure training, not disk
  sq.log_every_steps = 20
  workdir = args.workdir or tempfile.mkdtemp(prefix="prism_bench_squeeze_")
  mesh = mesh_lib.make_mesh(args.devices)
  start = time.perf_counter()
  accuracy = squeeze.run(config, workdir, mesh)["resnet18"]
  wall = time.perf_counter() - start
  meta = teacher_store.load_meta(squeeze.teacher_dir(config, workdir, "resnet18"))
  timing = meta.get("timing_last_run", {})
  steady_steps = max(timing.get("steps_run", 1) - 1, 1)
  images_per_s = steady_steps * args.batch / max(timing.get("train_seconds", 0.0), 1e-9)
  result = {
      "benchmark": "squeeze", "model": "resnet18", "stem": "small", "width": args.width,
      "epochs": args.epochs, "batch": args.batch, "devices": mesh.devices.size,
      "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
      "train_images_per_s": images_per_s, "first_step_s": timing.get("first_step_seconds"),
      "wall_s": wall, "test_top1": accuracy, "workdir": workdir,
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"{'model':10} {'width':>6} {'epochs':>6} {'batch':>5} {'img/s':>8} {'compile s':>9} {'wall s':>8} {'top-1':>7}")
  print(f"{'resnet18':10} {args.width:6.3g} {args.epochs:6.3g} {args.batch:5d} {images_per_s:8.1f} "
        f"{result['first_step_s']:9.1f} {wall:8.1f} {accuracy:7.4f}")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
