"""Recovery work units and the wave scheduler (SPEC 4.5).

A unit = one recovery batch (one IPC index x one chunk of classes). Units differ in their teacher
sets and iteration counts. A *wave* is one compiled, device-sharded call over `width` units (one
row each); inside it every device runs its rows one after another, each for its own iteration
count, evaluating only the teachers a unit uses (see recover/engine.py). So no teacher-iteration is
spent on a unit that does not need it (the useful-work fraction of executed teacher-iterations is
1 unless `sequential_teachers=False`), and what remains to optimize is load balance: a wave lasts
as long as its busiest device. The scheduler sorts units by cost (iterations x teachers, longest
first) before packing, so each wave holds units of similar cost; the device occupancy
(needed work / devices x wave durations) measures what is left idle.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np


def iterations_for(ipc_index: int, base: int, step: int, period: int) -> int:
  """T(i) = base - step * (i mod period): official PRISM 4000, 3500, ..., 500, then again."""
  t = base - step * (ipc_index % max(period, 1))
  if t < 1:
    raise ValueError(f"recover.iterations={base} - {step} * ({ipc_index} mod {period}) = {t}: "
                     "expected at least 1 iteration")
  return t


@dataclasses.dataclass(frozen=True)
class Unit:
  ipc_index: int
  chunk: int
  classes: tuple[int, ...]           # class indices of this recovery batch
  logit_teacher: str
  bn_teachers: tuple[str, ...]
  iterations: int

  @property
  def uid(self) -> str:
    return f"ipc{self.ipc_index:04d}_chunk{self.chunk:03d}"

  def teachers(self) -> tuple[str, ...]:
    """Distinct models this unit evaluates (the logit teacher first)."""
    return tuple(dict.fromkeys((self.logit_teacher,) + self.bn_teachers))


@dataclasses.dataclass(frozen=True)
class Wave:
  index: int
  units: tuple[Unit, ...]            # real units, in row order; rows past them are padding
  width: int
  iterations: int                    # max over units

  @property
  def uid(self) -> str:
    return f"wave{self.index:05d}"


def make_units(num_classes: int, ipc: int, classes_per_batch: int,
               select: Callable[[int, int], tuple[str, tuple[str, ...]]],
               iterations: Callable[[int], int], ipc_start: int = 0) -> list[Unit]:
  """All units for IPC indices [ipc_start, ipc) with class chunks of `classes_per_batch`."""
  chunks = [tuple(range(s, min(s + classes_per_batch, num_classes)))
            for s in range(0, num_classes, classes_per_batch)]
  units = []
  for i in range(ipc_start, ipc):
    for c, classes in enumerate(chunks):
      logit, bn = select(i, c)
      units.append(Unit(i, c, classes, logit, tuple(bn), iterations(i)))
  return units


def default_cost(unit: Unit) -> float:
  """Teacher-iterations of a unit (each distinct teacher evaluated once per iteration)."""
  return float(unit.iterations * len(unit.teachers()))


def plan_waves(units: Sequence[Unit], width: int,
               cost: Callable[[Unit], float] = default_cost) -> list[Wave]:
  """Packs units into waves of `width` rows; a wave's units share the class-chunk size."""
  groups: dict[int, list[Unit]] = {}
  for u in units:
    groups.setdefault(len(u.classes), []).append(u)
  waves = []
  for size in sorted(groups, reverse=True):
    members = sorted(groups[size], key=lambda u: (-cost(u), u.ipc_index, u.chunk))
    for start in range(0, len(members), width):
      batch = tuple(members[start:start + width])
      waves.append(Wave(len(waves), batch, width, max(u.iterations for u in batch)))
  return waves


def useful_work(waves: Sequence[Wave], num_devices: int, cost: Callable[[Unit], float] = default_cost,
                executed_cost: Callable[[Unit], float] | None = None) -> dict[str, float]:
  """Needed vs executed teacher-iterations, and device occupancy.

  `executed_cost` is what a unit really runs (default: what it needs, as the per-teacher conds
  guarantee); occupancy = needed / sum over waves of (devices x busiest device's executed work).
  """
  executed_cost = executed_cost or cost
  needed = executed = device_time = 0.0
  for w in waves:
    rows_per_device = w.width // num_devices
    loads = [0.0] * num_devices
    for row, u in enumerate(w.units):
      needed += cost(u)
      executed += executed_cost(u)
      loads[row // rows_per_device] += executed_cost(u)
    device_time += num_devices * max(loads)
  return {"needed": needed, "executed": executed,
          "useful_fraction": needed / executed if executed else 1.0,
          "device_occupancy": needed / device_time if device_time else 1.0}
