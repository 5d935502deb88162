"""Stage dispatch: each stage is a library function `run(config, workdir, mesh)`."""

from __future__ import annotations

import contextlib
import importlib

# Pipeline order; `all` runs the available stages in this order.
PIPELINE = ("squeeze", "diffusion", "recover", "relabel", "train", "evaluate")
AVAILABLE = PIPELINE


def sequence(spec: str) -> tuple[str, ...]:
  """The stages `config.stage` names, in pipeline order.

  'all' = every stage; 'recover+' = recover and every stage after it; 'relabel,train' = those
  stages; 'train' = that one.
  """
  expected = (f"expected a stage of {PIPELINE}, 'all', 'NAME+' (NAME and the stages after it) or "
              "a comma-separated list in pipeline order")
  spec = str(spec).strip()
  if spec == "all":
    return PIPELINE
  if spec.endswith("+"):
    if spec[:-1] not in PIPELINE:
      raise ValueError(f"stage={spec!r}: {expected}")
    return PIPELINE[PIPELINE.index(spec[:-1]):]
  names = tuple(part.strip() for part in spec.split(","))
  if not all(n in PIPELINE for n in names) or len(set(names)) != len(names):
    raise ValueError(f"stage={spec!r}: {expected}")
  if list(names) != sorted(names, key=PIPELINE.index):
    raise ValueError(f"stage={spec!r}: stages must be listed in pipeline order {PIPELINE}")
  return names


def run_stage(name: str, config, workdir: str, mesh):
  """Runs the stage(s) that `name` names (see `sequence`); one stage returns its result, several a
  dict of results by stage."""
  names = sequence(name)
  if len(names) > 1 or name == "all":
    return {stage: run_stage(stage, config, workdir, mesh) for stage in names}
  name = names[0]
  if name not in AVAILABLE:
    raise NotImplementedError(f"stage={name!r} is not available in this version of prism_jax "
                              f"(available: {AVAILABLE})")
  if name != "recover":  # recovery alone needs no shared work directory (process 0 gathers its images)
    from prism_jax.parallel import multihost
    multihost.check_shared_directory(workdir, name)
  from prism_jax.train import precision
  scope = precision.resolve(config, name).scope() if name in precision.STAGES else contextlib.nullcontext()
  with scope:  # the stage's programs are traced under its matmul precision
    return importlib.import_module(f"prism_jax.stages.{name}").run(config, workdir, mesh)
