"""Stage dispatch: each stage is a module with `validate(config)` (no data) and `run(config, workdir, mesh)`.

Stages are wiring: a stage validates its sections, opens its inputs, calls library code and writes its
outputs (paths from io/layout.py); no stage imports another.
"""

from __future__ import annotations

import contextlib
import importlib

from prism_jax import errors

# Pipeline order; `all` runs every stage in this order.
PIPELINE = ("squeeze", "diffusion", "distill", "relabel", "train", "evaluate")
ALIASES = {"recover": "distill"}  # the distill stage's former name (it made the recovered set only)
AVAILABLE = PIPELINE


def _canonical(name: str) -> str:
  return ALIASES.get(name, name)


def sequence(spec: str) -> tuple[str, ...]:
  """The stages `config.stage` names, in pipeline order.

  'all' = every stage; 'distill+' = distill and every stage after it; 'relabel,train' = those
  stages; 'train' = that one. 'recover' is an alias of 'distill'.
  """
  expected = (f"expected a stage of {PIPELINE} (or 'recover', an alias of 'distill'), 'all', 'NAME+' (NAME and "
              "the stages after it) or a comma-separated list in pipeline order")
  spec = str(spec).strip()
  if spec == "all":
    return PIPELINE
  if spec.endswith("+"):
    first = _canonical(spec[:-1])
    if first not in PIPELINE:
      raise errors.ConfigError(f"stage={spec!r}: {expected}")
    return PIPELINE[PIPELINE.index(first):]
  names = tuple(_canonical(part.strip()) for part in spec.split(","))
  if not all(n in PIPELINE for n in names) or len(set(names)) != len(names):
    raise errors.ConfigError(f"stage={spec!r}: {expected}")
  if list(names) != sorted(names, key=PIPELINE.index):
    raise errors.ConfigError(f"stage={spec!r}: stages must be listed in pipeline order {PIPELINE}")
  return names


def _module(name: str):
  return importlib.import_module(f"prism_jax.stages.{name}")


def validate(config, names) -> None:
  """Every selected stage checks its config sections (before any stage runs or data is opened)."""
  for name in names:
    _module(name).validate(config)


def run_stage(name: str, config, workdir: str, mesh):
  """Runs the stage(s) that `name` names (see `sequence`); one stage returns its result, several a
  dict of results by stage. Every selected stage's config is validated first."""
  names = sequence(name)
  validate(config, names)
  if len(names) > 1 or name == "all":
    return {stage: _run_one(stage, config, workdir, mesh) for stage in names}
  return _run_one(names[0], config, workdir, mesh)


def _run_one(name: str, config, workdir: str, mesh):
  if name != "distill":  # distilling alone needs no shared work directory (process 0 gathers the sets)
    from prism_jax.parallel import multihost
    multihost.check_shared_directory(workdir, name)
  from prism_jax.train import precision
  section = "recover" if name == "distill" else name
  scope = precision.resolve(config, section).scope() if section in precision.STAGES else contextlib.nullcontext()
  with scope:  # the stage's programs are traced under its matmul precision
    return _module(name).run(config, workdir, mesh)
