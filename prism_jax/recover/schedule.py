"""Recovery work units and the wave scheduler (SPEC 4.5).

A unit = one recovery batch (one IPC index x one chunk of classes). Units differ in their teacher
sets and iteration counts. The scheduler packs units into *waves*: each wave is one vmapped,
device-sharded program that runs exactly the teachers its units use, for as many iterations as its
longest unit (shorter units are frozen once done). Waves only mix units with the same teacher
set, and within a set units are sorted by iteration count, so little compute is spent on masked
steps. The useful-work fraction = needed teacher-iterations / executed teacher-iterations.
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
  units: tuple[Unit, ...]            # real units; the wave is padded to `width` with copies
  width: int
  teacher_set: tuple[str, ...]
  bn_teachers: tuple[str, ...]
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


def plan_waves(units: Sequence[Unit], width: int,
               group_by_bn_set: bool = True) -> list[Wave]:
  """Packs units into waves of `width` (a multiple of the device count).

  Units of a wave share the same class-chunk size (static shapes) and teacher set; sorted by
  iteration count (longest first) so each wave's units have similar T.
  """
  groups: dict[tuple, list[Unit]] = {}
  for u in units:
    key = (len(u.classes), u.teachers(), u.bn_teachers if group_by_bn_set else ())
    groups.setdefault(key, []).append(u)
  waves = []
  for key in sorted(groups, key=lambda k: (-k[0], k[1], k[2])):
    members = sorted(groups[key], key=lambda u: (-u.iterations, u.ipc_index, u.chunk))
    for start in range(0, len(members), width):
      batch = tuple(members[start:start + width])
      waves.append(Wave(len(waves), batch, width, batch[0].teachers(), batch[0].bn_teachers,
                        max(u.iterations for u in batch)))
  return waves


def useful_work(waves: Sequence[Wave], teacher_cost: dict[str, float] | None = None) -> dict[str, float]:
  """Needed vs executed teacher-iterations (optionally weighted by per-teacher cost)."""
  cost = (lambda t: teacher_cost.get(t, 1.0)) if teacher_cost else (lambda t: 1.0)
  needed = executed = 0.0
  for w in waves:
    wave_cost = sum(cost(t) for t in w.teacher_set)
    executed += w.width * w.iterations * wave_cost
    needed += sum(u.iterations * sum(cost(t) for t in u.teachers()) for u in w.units)
  return {"needed": needed, "executed": executed,
          "useful_fraction": needed / executed if executed else 1.0}
