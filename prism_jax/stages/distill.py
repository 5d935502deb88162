"""Distill stage (alias `recover`): makes every set of `config.image_sets` with its method
(prism_jax/methods/), each in the recover layout under io/layout.py's `distilled_dir`.

For each set: skip it when its completion marker matches this config and its files are intact
(io/completion.py); refuse it when it was made with another config; else plan it (the method opens
its inputs and checks what needs the data), record the in-progress fingerprint (run.json: a resumed
run must ask for the same set), run it (resumable per unit) and write the marker last, with the
sizes and checksums of images.npz, manifest.jsonl and classes.json.
"""

from __future__ import annotations

import os

from prism_jax import methods
from prism_jax.data import sources
from prism_jax.io import artifacts, completion, fs, layout
from prism_jax.parallel import multihost

RUN_FILE = "run.json"


def validate(config) -> None:
  methods.validate(config)


def run(config, workdir: str, mesh) -> dict:
  requests = methods.validate(config)
  if not requests:
    print("[distill] nothing to make: every set of image_sets is a directory", flush=True)
    return {}
  dataset = sources.open_dataset(config.data)
  teachers_dir = layout.teachers_dir(config, workdir)
  return {request.name: make_set(request, config, workdir, dataset, mesh, teachers_dir) for request in requests}


def make_set(request, config, workdir: str, dataset, mesh, teachers_dir: str) -> dict:
  method = methods.get(request.method)
  ctx = methods.Context(config=config, request=request, workdir=workdir, dataset=dataset, mesh=mesh,
                        teachers_dir=teachers_dir)
  fp = method.fingerprint(ctx)
  marker = layout.distilled_marker(workdir, request.name)
  what = "the recovered set" if request.name == layout.RECOVER_SET else f"the '{request.name}' set"
  done = completion.finished(marker, fp, what, tag=ctx.tag)
  if done is not None:
    if "num_images" in done:
      print(f"[{ctx.tag}] already done: {done['num_images']} images in {ctx.out_dir}", flush=True)
    else:  # this process cannot see process 0's work directory
      print(f"[{ctx.tag}] already done (process 0's {marker})", flush=True)
    return done
  plan = method.plan(ctx)
  run_path = os.path.join(ctx.out_dir, RUN_FILE)
  fs.makedirs(ctx.out_dir)
  if fs.exists(run_path):
    artifacts.check_same(f"{what} in progress", run_path, fp, artifacts.read_json(run_path))
  elif multihost.is_main_process():
    artifacts.write_json(run_path, fp)
  meta = {"fingerprint": fp, "method": request.method, **method.run(ctx, plan)}
  if multihost.is_main_process():
    meta["files"] = completion.record_files(ctx.out_dir, methods.base.SET_FILES)
    artifacts.write_json(marker, meta)
  multihost.barrier(f"distill {request.name}: exported")  # no process moves on before the set is written
  if multihost.is_main_process():
    print(f"[{ctx.tag}] {meta['num_images']} images -> {ctx.out_dir}", flush=True)
  return meta
