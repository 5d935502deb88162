"""Stage dispatch: each stage is a library function `run(config, workdir, mesh)`."""

from __future__ import annotations

import importlib

# Pipeline order; `all` runs the available stages in this order.
PIPELINE = ("squeeze", "recover", "relabel", "train", "evaluate")
AVAILABLE = PIPELINE


def run_stage(name: str, config, workdir: str, mesh):
  if name == "all":
    results = {}
    for stage in PIPELINE:
      if stage in AVAILABLE:
        results[stage] = run_stage(stage, config, workdir, mesh)
    return results
  if name not in PIPELINE:
    raise ValueError(f"stage={name!r}: expected one of {PIPELINE + ('all',)}")
  if name not in AVAILABLE:
    raise NotImplementedError(f"stage={name!r} is not available in this version of prism_jax "
                              f"(available: {AVAILABLE})")
  return importlib.import_module(f"prism_jax.stages.{name}").run(config, workdir, mesh)
