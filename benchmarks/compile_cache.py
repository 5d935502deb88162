"""Compilation with and without JAX's persistent cache: the same run twice, in fresh work directories.

  python benchmarks/compile_cache.py --cifar10 /path/to/cifar10 --out bench_out/compile_cache.json
  python benchmarks/compile_cache.py --runs quickstart          # only the digits quickstart

Each run is the ordinary CLI (`python -m prism_jax.main`) with `--compilation_cache_dir` pointing at
a cache that is empty before the first run; the second run uses a new work directory, so it
recomputes everything and only the compiled programs are reused. From each run's closing line
(`[prism_jax] compilation: N program(s), S s ...`) and its wall time the table shows compile seconds,
the other seconds, and the compile share of the wall time.

Runs:
  quickstart     configs/quickstart.py, every stage (squeeze, recover, relabel, train, evaluate)
  cifar10_recover  the CIFAR-10 PRISM recover of configs/cifar10_prism.py:ipc10 (5 BN/logit teachers,
                 bernoulli sets drawn per IPC index; static gating: one program per teacher, plus two) with
                 random-weight width-0.25 teachers and the quality benchmark's small budget
                 (T = 120 - 10 (i mod 8)): the stage is the same, the teachers need no training.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SUMMARY = re.compile(r"compilation: (\d+) program\(s\), ([\d.]+) s \(.*?\)(?:, (\d+) of them read)?")


def write_teachers(teachers_dir: str, names, width: float) -> None:
  import jax.numpy as jnp
  from prism_jax import models
  from prism_jax.io import teacher_store
  class_names = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
  for seed, name in enumerate(names):
    model = models.create_model(name, num_classes=10, stem="small", width=width)
    variables = models.random_variables(model, (1, 32, 32, 3), seed=seed)
    teacher_store.save_teacher(os.path.join(teachers_dir, name), name=name, variables=variables,
                               model_config=dict(name=name, num_classes=10, stem="small", width=width, image_size=32),
                               class_names=class_names, dataset="cifar10", test_accuracy=None)
  del jnp


def run_twice(label: str, config: str, overrides: list[str], root: str) -> list[dict]:
  cache = os.path.join(root, f"{label}_cache")
  rows = []
  for attempt in (1, 2):
    workdir = os.path.join(root, f"{label}_run{attempt}")
    cmd = [sys.executable, "-m", "prism_jax.main", f"--config={config}", f"--workdir={workdir}",
           f"--compilation_cache_dir={cache}", *overrides]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
      raise SystemExit(f"{label} run {attempt} failed:\n{proc.stderr[-3000:]}")
    match = SUMMARY.search(proc.stdout)
    programs, compile_s, hits = int(match.group(1)), float(match.group(2)), int(match.group(3) or 0)
    rows.append({"run": label, "attempt": attempt, "wall_s": wall, "compile_s": compile_s,
                 "other_s": wall - compile_s, "compile_share": compile_s / wall, "programs": programs,
                 "cache_hits": hits})
    print(f"  {label:16} run {attempt}: wall {wall:7.1f} s  compile {compile_s:6.1f} s ({100 * compile_s / wall:4.1f}%)  "
          f"{programs} programs, {hits} from the cache", flush=True)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--runs", default="quickstart,cifar10_recover")
  parser.add_argument("--cifar10", default="", help="CIFAR-10 arrays directory (for cifar10_recover)")
  parser.add_argument("--out", default="bench_out/compile_cache.json")
  args = parser.parse_args()
  root = tempfile.mkdtemp(prefix="prism_compile_cache_")
  rows = []
  try:
    for run in args.runs.split(","):
      if run == "quickstart":
        rows += run_twice(run, os.path.join(ROOT, "configs/quickstart.py"), [], root)
      elif run == "cifar10_recover":
        if not args.cifar10:
          parser.error("--cifar10 is needed for cifar10_recover")
        teachers = os.path.join(root, "teachers")
        write_teachers(teachers, ("resnet18", "mobilenet_v2", "efficientnet_b0", "shufflenet_v2_x0_5", "alexnet"), 0.25)
        rows += run_twice(run, os.path.join(ROOT, "configs/cifar10_prism.py") + ":ipc10",
                          ["--config.stage=recover", f"--config.data.path={os.path.abspath(args.cifar10)}",
                           f"--config.teachers_dir={teachers}", "--config.recover.iterations=120",
                           "--config.recover.iteration_step=10", "--config.recover.iterations_per_call=40",
                           "--config.recover.checkpoint_every_iterations=0", "--config.recover.remat=False"], root)
      else:
        parser.error(f"--runs: unknown {run!r}")
  finally:
    shutil.rmtree(root, ignore_errors=True)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"benchmark": "compile_cache", "rows": rows}, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
