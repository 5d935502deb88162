"""Recovery work units and the wave scheduler (SPEC 4.5).

A unit = one recovery batch (one IPC index x one chunk of classes). Units differ in their teacher
sets and iteration counts. A *wave* is one compiled, device-sharded call over `width` units (one
row each); each device holds `width / devices` consecutive rows and runs them as one vmapped
group (see recover/engine.py): a teacher runs on a device while any of its rows needs it, for all
of the device's rows. So the scheduler sorts units by cost (iterations x teachers, longest
first), then by teacher set and iteration count, and packs them in that order: rows that share a
device share their teachers and (nearly) their T, and each wave holds units of similar cost.
With one row per device (the default) nothing a device runs is unneeded. Two figures measure what
is left: the useful-work fraction (needed / executed teacher-iterations, counting every row of a
device group while a teacher runs, padding included) and the device occupancy (needed work /
devices x the waves' busiest-device durations).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from prism_jax import errors


def iterations_for(ipc_index: int, base: int, step: int, period: int) -> int:
  """T(i) = base - step * (i mod period): official PRISM 4000, 3500, ..., 500, then again."""
  t = base - step * (ipc_index % max(period, 1))
  if t < 1:
    raise errors.ConfigError(f"recover.iterations={base} - {step} * ({ipc_index} mod {period}) = {t}: "
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
               cost: Callable[[Unit], float] = default_cost, rows_per_device: int = 1) -> list[Wave]:
  """Packs units into waves of `width` rows; a wave's units share the class-chunk size.

  One row per device: longest first (balanced waves). Several vmapped rows per device: by
  iteration count, then teacher set, so that a device's rows run the same teachers as long.
  """
  groups: dict[int, list[Unit]] = {}
  for u in units:
    groups.setdefault(len(u.classes), []).append(u)
  if rows_per_device > 1:
    order = lambda u: (-u.iterations, u.teachers(), u.ipc_index, u.chunk)
  else:
    order = lambda u: (-cost(u), u.teachers(), -u.iterations, u.ipc_index, u.chunk)
  waves = []
  for size in sorted(groups, reverse=True):
    members = sorted(groups[size], key=order)
    for start in range(0, len(members), width):
      batch = tuple(members[start:start + width])
      waves.append(Wave(len(waves), batch, width, max(u.iterations for u in batch)))
  return waves


def vmapped_group_cost(units: Sequence[Unit], rows: int) -> float:
  """Teacher-iterations a device executes for `units` held in `rows` vmapped rows (strategy 'pre').

  Each teacher runs, for every row, until the last unit that uses it is done.
  """
  longest: dict[str, int] = {}
  for u in units:
    for name in u.teachers():
      longest[name] = max(longest.get(name, 0), u.iterations)
  return float(rows * sum(longest.values()))


def useful_work(waves: Sequence[Wave], num_devices: int, cost: Callable[[Unit], float] = default_cost,
                group_cost: Callable[[Sequence[Unit], int], float] = vmapped_group_cost,
                wave_wide: bool = False) -> dict[str, float]:
  """Needed vs executed teacher-iterations, and device occupancy.

  `cost(u)` is what unit u needs; `group_cost(units, rows)` is what a device holding `units` in
  `rows` rows executes. With `wave_wide` (static teacher gating: one program for all devices)
  every device runs what the whole wave needs: its load is group_cost(all the wave's units, rows).
  Occupancy = needed / sum over waves of (devices x busiest device's work).
  """
  needed = executed = device_time = 0.0
  for w in waves:
    rows = w.width // num_devices
    loads = []
    for d in range(num_devices):
      members = w.units[d * rows:(d + 1) * rows]
      needed += sum(cost(u) for u in members)
      if wave_wide:
        loads.append(group_cost(w.units, rows))
      else:
        loads.append(group_cost(members, rows) if members else 0.0)
    executed += sum(loads)
    device_time += num_devices * max(loads)
  return {"needed": needed, "executed": executed,
          "useful_fraction": needed / executed if executed else 1.0,
          "device_occupancy": needed / device_time if device_time else 1.0}
