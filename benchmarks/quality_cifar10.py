"""Quality benchmark on real CIFAR-10: random_real vs SRe2L vs PRISM (pre, bernoulli) vs PRISM intra.

  python benchmarks/quality_cifar10.py --data /path/to/cifar10 --budget small \
      --out bench_out/quality_cifar10.json

One protocol for every method (default `prism`: 4-teacher norm-rescaled soft labels, RRC 0.25-1 +
flip + CutMix, mse_gt, prism_cos2): the image sets differ, nothing else. Steps:
  1. squeeze the five small-stem teachers (resnet18, mobilenet_v2, efficientnet_b0,
     shufflenet_v2_x0_5, alexnet), cached in --cache so later runs reuse them;
  2. per method a work directory under --cache: recover (not for random_real), relabel, train
     (one student per seed);
  3. the evaluate stage over all of them: student top-1 (best and last, mean ± std over seeds),
     intra-/inter-class cosine similarity under the resnet18 teacher, time per stage; writes a
     report.md with the image grid and UMAP plots.
Every stage is resumable: rerunning continues where a killed run stopped.

Budgets: `small` fits in about an hour on a 2-core CPU (narrow teachers trained briefly on a
10k-image subset, short recovery, short student training); `large` is the paper-scale recipe
shrunk only where CIFAR-10 needs it (an accelerator is advisable).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TEACHERS = ("resnet18", "mobilenet_v2", "efficientnet_b0", "shufflenet_v2_x0_5", "alexnet")
METHODS = ("random_real", "sre2l", "prism", "prism_intra")

BUDGETS = {
    # squeeze: teacher width, images per class, epochs; recover: T (PRISM varies it by 1/8 steps);
    # train: student width, epochs, evaluation interval, seeds.
    "small": dict(teacher_width=0.25, max_per_class=1000, teacher_epochs=2, iterations=120, iteration_step=10,
                  student_width=0.25, student_epochs=100, eval_every=50, seeds=(0, 1)),
    "smoke": dict(teacher_width=0.125, max_per_class=50, teacher_epochs=1, iterations=8, iteration_step=1,
                  student_width=0.125, student_epochs=2, eval_every=1, seeds=(0,)),  # checks the wiring only
    "large": dict(teacher_width=1.0, max_per_class=0, teacher_epochs=60, iterations=1000, iteration_step=125,
                  student_width=1.0, student_epochs=300, eval_every=25, seeds=(0, 1, 2)),
}


def base(args, budget):
  from configs import common
  config = common.base_config()
  config.seed = 0
  config.data = common.data_config(source="arrays", name="cifar10", path=os.path.abspath(args.data))
  config.progress_interval_s = 30.0
  teachers_dir = os.path.join(args.cache, f"teachers_{args.budget}", "teachers")
  sq = config.squeeze
  sq.teachers, sq.width, sq.epochs = TEACHERS, budget["teacher_width"], float(budget["teacher_epochs"])
  sq.warmup_epochs, sq.eval_every_epochs, sq.eval_batch_size = 0.5, 0.0, 500
  sq.checkpoint_every_steps, sq.log_every_steps = 200, 50
  common.set_protocol(config, args.protocol)
  config.relabel.teachers_dir = teachers_dir
  tr = config.train
  tr.width, tr.epochs, tr.eval_every_epochs = budget["student_width"], budget["student_epochs"], float(budget["eval_every"])
  tr.seeds, tr.eval_batch_size, tr.log_every_steps = tuple(budget["seeds"]), 500, 50
  return config, teachers_dir


def method_config(args, budget, method):
  from configs import common
  config, teachers_dir = base(args, budget)
  rc = config.recover
  if method == "random_real":
    config.image_sets = ("random_real",)
  else:
    common.set_recover_method(config, method)
    config.image_sets = ("recover",)
  rc.teachers_dir = teachers_dir
  rc.ipc, rc.classes_per_batch = args.ipc, 10
  rc.iterations = budget["iterations"]
  rc.iteration_step = 0 if method == "sre2l" else budget["iteration_step"]
  rc.iterations_per_call, rc.checkpoint_every_iterations = 40, 0
  rc.remat = False                          # 32 px: memory is no concern
  return config


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data", required=True, help="directory with CIFAR-10 train.npz / test.npz")
  parser.add_argument("--budget", choices=sorted(BUDGETS), default="small")
  parser.add_argument("--ipc", type=int, default=10, help="images per class (10; 50 as an option)")
  parser.add_argument("--protocol", default="prism", help="evaluation protocol for every method")
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "prism_jax", "quality_cifar10"),
                      help="teachers and per-method work directories (outside the repository)")
  parser.add_argument("--out", default="bench_out/quality_cifar10.json")
  args = parser.parse_args()
  budget = BUDGETS[args.budget]
  methods = [m for m in args.methods.split(",") if m]
  unknown = sorted(set(methods) - set(METHODS))
  if unknown:
    parser.error(f"--methods: unknown {unknown}; expected a subset of {METHODS}")

  import jax
  from prism_jax.io import artifacts
  from prism_jax.parallel import mesh as mesh_lib
  from prism_jax.stages import run_stage

  mesh = mesh_lib.make_mesh(-1)
  times = {}
  config, teachers_dir = base(args, budget)
  config.data.max_per_class = budget["max_per_class"]
  start = time.perf_counter()
  # Teachers (cached): the small budget trains them on a class-balanced subset.
  from prism_jax.data import sources
  from prism_jax.stages import squeeze
  dataset = sources.open_dataset(config.data)
  teacher_acc = {name: squeeze.squeeze_teacher(config, name, dataset, os.path.dirname(teachers_dir), mesh)
                 for name in TEACHERS}
  times["squeeze_s"] = time.perf_counter() - start

  run_root = os.path.join(args.cache, args.budget, f"ipc{args.ipc}_{args.protocol}")
  workdirs = {}
  for method in methods:
    workdir = os.path.join(run_root, method)
    os.makedirs(workdir, exist_ok=True)
    config = method_config(args, budget, method)
    artifacts.write_json(os.path.join(workdir, "config.json"), config.to_dict())
    stages = ("relabel", "train") if method == "random_real" else ("recover", "relabel", "train")
    for stage in stages:
      t0 = time.perf_counter()
      run_stage(stage, config, workdir, mesh)
      times[f"{method}/{stage}_s"] = time.perf_counter() - t0
    workdirs[method] = workdir

  first = methods[0]
  config = method_config(args, budget, first)
  config.evaluate.compare_workdirs = tuple(workdirs[m] for m in methods[1:])
  results = run_stage("evaluate", config, workdirs[first], mesh)
  summary = {
      "benchmark": "quality_cifar10", "budget": args.budget, "budget_settings": budget, "ipc": args.ipc,
      "protocol": args.protocol, "backend": jax.default_backend(), "devices": mesh.devices.size,
      "teacher_test_top1": teacher_acc, "rows": results["rows"], "similarity": {
          k: {kk: v["similarity"][kk] for kk in ("intra_mean", "inter_mean", "intra_per_class")}
          for k, v in results["sets"].items()},
      "stage_seconds_this_run": times, "report": results.get("report"), "workdirs": workdirs,
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(artifacts.to_jsonable(summary), f, indent=2)
  print("teacher test top-1: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in teacher_acc.items()))
  print(f"wrote {args.out}; report {results.get('report')}")


if __name__ == "__main__":
  main()
