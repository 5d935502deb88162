"""Quality benchmark on real CIFAR-10: every method of configs/cifar10_compare.py (random real images, SRe2L,
PRISM, PRISM intra, RDED, DPS, DiT samples, DAP) under one protocol.

  python benchmarks/quality_cifar10.py --data /path/to/cifar10 --budget small \
      --out bench_out/quality_cifar10.json

A thin wrapper around the multi-method config `configs/cifar10_compare.py` (the same run is
`python -m prism_jax.main --config configs/cifar10_compare.py:small --workdir DIR
--config.data.path=/path/to/cifar10`): one work directory, every method's set made by the distill
stage, then relabeled, trained on and evaluated under one protocol (default `prism`). The teachers
are squeezed once per budget into --cache (reused by later runs, any IPC or protocol); every stage is
resumable, so rerunning continues where a killed run stopped. Writes the evaluate table and timing
as JSON.

Budgets: see configs/cifar10_compare.py (`small` fits in about an hour on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import cifar10_compare  # noqa: E402  (pure data: imports no JAX)

TEACHERS, METHODS, BUDGETS = cifar10_compare.TEACHERS, cifar10_compare.METHODS, cifar10_compare.BUDGETS


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data", required=True, help="directory with CIFAR-10 train.npz / test.npz")
  parser.add_argument("--budget", choices=sorted(BUDGETS), default="small")
  parser.add_argument("--ipc", type=int, default=10, help="images per class (10; 50 as an option)")
  parser.add_argument("--protocol", default="prism", help="evaluation protocol for every method")
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "prism_jax", "quality_cifar10"),
                      help="teachers and work directories (outside the repository)")
  parser.add_argument("--out", default="bench_out/quality_cifar10.json")
  args = parser.parse_args()
  budget = BUDGETS[args.budget]
  methods = [m for m in args.methods.split(",") if m]
  unknown = sorted(set(methods) - set(METHODS))
  if unknown:
    parser.error(f"--methods: unknown {unknown}; expected a subset of {METHODS}")

  import jax
  from prism_jax import config_checks, runtime
  from prism_jax.io import artifacts, layout
  from prism_jax.parallel import mesh as mesh_lib
  from prism_jax.stages import run_stage

  runtime.configure_jax()
  config = cifar10_compare.make_config(budget, ipc=args.ipc, protocol=args.protocol, methods=tuple(methods),
                                       data_path=os.path.abspath(args.data))
  config.teachers_dir = os.path.join(args.cache, f"teachers_{args.budget}", "teachers")
  workdir = os.path.join(args.cache, args.budget, f"ipc{args.ipc}_{args.protocol}")
  config_checks.validate(config)
  os.makedirs(workdir, exist_ok=True)
  artifacts.write_json(layout.config_file(workdir), config.to_dict())
  mesh = mesh_lib.make_mesh(-1)
  start = time.perf_counter()
  results = run_stage("all", config, workdir, mesh)
  teacher_acc = results["squeeze"]
  evaluation = results["evaluate"]
  summary = {
      "benchmark": "quality_cifar10", "budget": args.budget, "budget_settings": budget, "ipc": args.ipc,
      "protocol": args.protocol, "backend": jax.default_backend(), "devices": mesh.devices.size,
      "config": "configs/cifar10_compare.py", "teacher_test_top1": teacher_acc, "rows": evaluation["rows"],
      "similarity": {k: {kk: v["similarity"][kk] for kk in ("intra_mean", "inter_mean", "intra_per_class")}
                     for k, v in evaluation["sets"].items()},
      "wall_seconds_this_run": time.perf_counter() - start, "report": evaluation.get("report"), "workdir": workdir,
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(artifacts.to_jsonable(summary), f, indent=2)
  print("teacher test top-1: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in teacher_acc.items()))
  print(f"wrote {args.out}; report {os.path.join(workdir, evaluation.get('report') or '')}")


if __name__ == "__main__":
  main()
