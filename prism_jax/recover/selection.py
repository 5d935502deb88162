"""Teacher selection for recovery (SPEC 4.2): which logit teacher and which BN teachers a unit uses.

A *unit* is one recovery batch: IPC index `ipc_index`, class chunk `chunk`. Every draw comes from a
numpy Generator seeded with (seed, purpose, ipc_index[, chunk][, iteration]), so any unit's
teachers can be recomputed from the config alone, independently of scheduling or device count.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

import numpy as np

from prism_jax import errors

DISTRIBUTIONS = ("bernoulli", "uniform_subsets", "fixed", "single")
STRATEGIES = ("pre", "intra")
GRANULARITIES = ("ipc", "batch")
_PURPOSE_PRE, _PURPOSE_INTRA = 1, 2


@dataclasses.dataclass(frozen=True)
class SelectionSpec:
  logit_teacher: str
  bn_primary: str
  bn_pool: tuple[str, ...]
  distribution: str = "bernoulli"
  k_max: int = 4
  p: float = 0.5
  include_primary: bool = True        # uniform_subsets: the primary is always in the subset
  fixed_teachers: tuple[str, ...] = ()
  logit_pool: tuple[str, ...] = ()    # intra: logit teacher re-drawn from here (default: logit teacher only)

  def validate(self) -> None:
    if self.distribution not in DISTRIBUTIONS:
      raise errors.ConfigError(f"recover.distribution={self.distribution!r}: expected one of {DISTRIBUTIONS}")
    if self.k_max < 1:
      raise errors.ConfigError(f"recover.k_max={self.k_max}: expected >= 1")
    if not 0.0 <= self.p <= 1.0:
      raise errors.ConfigError(f"recover.p={self.p}: expected a probability in [0, 1]")
    if len(set(self.bn_pool)) != len(self.bn_pool):
      raise errors.ConfigError(f"recover.bn_pool={self.bn_pool}: names must be distinct")
    if self.bn_primary in self.bn_pool:
      raise errors.ConfigError(f"recover.bn_pool contains the BN primary '{self.bn_primary}': list only the extras")
    if self.distribution == "bernoulli" and self.k_max - 1 > len(self.bn_pool):
      raise errors.ConfigError(f"recover.k_max={self.k_max} needs {self.k_max - 1} extra BN teachers, but "
                       f"recover.bn_pool has only {len(self.bn_pool)}: {self.bn_pool}")
    if self.distribution == "uniform_subsets":
      available = len(self.bn_pool) + 1
      if self.k_max > available:
        raise errors.ConfigError(f"recover.k_max={self.k_max} is larger than the {available} BN teachers "
                         f"available (primary '{self.bn_primary}' + recover.bn_pool {self.bn_pool})")
    if self.distribution == "fixed" and not self.fixed_teachers:
      raise errors.ConfigError("recover.distribution='fixed' needs recover.fixed_teachers (a list of model names)")

  def all_bn_teachers(self) -> tuple[str, ...]:
    """Every model the distribution can draw as a BN teacher."""
    if self.distribution == "fixed":
      return tuple(self.fixed_teachers)
    if self.distribution == "single":
      return (self.bn_primary,)
    return tuple(dict.fromkeys((self.bn_primary,) + self.bn_pool))

  def all_logit_teachers(self) -> tuple[str, ...]:
    return tuple(dict.fromkeys((self.logit_teacher,) + self.logit_pool))


def _rng(seed: int, purpose: int, *indices: int) -> np.random.Generator:
  return np.random.default_rng([seed, purpose, *indices])


def draw_bn_teachers(spec: SelectionSpec, rng: np.random.Generator) -> tuple[str, ...]:
  """One draw of the BN-teacher set M, primary first when it is included."""
  if spec.distribution == "single":
    return (spec.bn_primary,)
  if spec.distribution == "fixed":
    return tuple(spec.fixed_teachers)
  if spec.distribution == "bernoulli":
    # Official PRISM: k_max - 1 extra slots, each filled with probability p by a distinct member
    # drawn uniformly from the remaining pool.
    chosen: list[str] = []
    for _ in range(spec.k_max - 1):
      if rng.random() < spec.p:
        remaining = [m for m in spec.bn_pool if m not in chosen]
        chosen.append(remaining[rng.integers(len(remaining))])
    return (spec.bn_primary,) + tuple(chosen)
  # uniform_subsets (paper eq. 5): uniform over all valid subsets.
  subsets = valid_subsets(spec)
  return subsets[rng.integers(len(subsets))]


def valid_subsets(spec: SelectionSpec) -> list[tuple[str, ...]]:
  """All subsets `uniform_subsets` draws from, in a fixed order."""
  if spec.include_primary:
    extras = [c for r in range(0, spec.k_max) for c in itertools.combinations(spec.bn_pool, r)]
    return [(spec.bn_primary,) + c for c in extras]
  candidates = (spec.bn_primary,) + spec.bn_pool
  return [c for r in range(1, spec.k_max + 1) for c in itertools.combinations(candidates, r)]


def pre_selection(spec: SelectionSpec, seed: int, ipc_index: int, chunk: int, granularity: str):
  """(logit teacher, BN teachers) fixed for the whole optimization of one unit (`pre` strategy)."""
  if granularity not in GRANULARITIES:
    raise errors.ConfigError(f"recover.granularity={granularity!r}: expected one of {GRANULARITIES}")
  indices = (ipc_index,) if granularity == "ipc" else (ipc_index, chunk)
  return spec.logit_teacher, draw_bn_teachers(spec, _rng(seed, _PURPOSE_PRE, *indices))


def intra_selection(spec: SelectionSpec, seed: int, ipc_index: int, chunk: int, iteration: int,
                    granularity: str):
  """(logit teacher, BN teachers) re-drawn at one iteration (`intra` strategy)."""
  indices = (ipc_index, iteration) if granularity == "ipc" else (ipc_index, chunk, iteration)
  rng = _rng(seed, _PURPOSE_INTRA, *indices)
  logit_pool = spec.all_logit_teachers()
  logit = logit_pool[rng.integers(len(logit_pool))]
  return logit, draw_bn_teachers(spec, rng)


def bn_average_count(bn_teachers: Sequence[str], has_bn: dict[str, bool], count_bn_only: bool) -> int:
  """K of the objective: official PRISM counts a BN-less teacher (alexnet) too."""
  if count_bn_only:
    return max(1, sum(1 for t in bn_teachers if has_bn[t]))
  return len(bn_teachers)
