"""Validation of the whole config before anything runs (no data read, no teacher loaded).

`validate(config)` checks the fields every run uses, then asks each selected stage to check its own
sections (`stages.validate`): a wrong field in a later stage is reported before the first stage
starts. Errors are errors.ConfigError naming the field and what was expected.
"""

from __future__ import annotations

import math

from prism_jax import errors, stages
from prism_jax.train import precision

_MOVED = {"recover.teachers_dir": "teachers_dir", "relabel.teachers_dir": "teachers_dir"}


def validate(config) -> tuple[str, ...]:
  """Raises ConfigError naming the first invalid field; returns the selected stages."""
  try:
    names = stages.sequence(config.stage)
  except errors.ConfigError as e:
    raise errors.ConfigError(f"config.{e}") from None
  for old, new in _MOVED.items():
    section, field = old.split(".")
    if section in config and field in config[section]:
      raise errors.ConfigError(f"config.{old}: moved to config.{new} (one teachers directory for every stage); "
                               f"set config.{new} instead")
  seed = config.seed
  if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
    raise errors.ConfigError(f"config.seed={seed!r}: expected a non-negative integer")
  interval = float(config.get("progress_interval_s", 0.0))
  if not (math.isfinite(interval) and interval >= 0):
    raise errors.ConfigError(f"config.progress_interval_s={interval!r}: expected seconds >= 0")
  precision.validate(config)
  stages.validate(config, names)
  return names
