"""The recover plan (SPEC 4): from a method's settings to teachers, units, waves and per-iteration
teacher weights, all functions of the config alone.

`rc` is a recover settings section (`config.recover`, or a method instance's resolved settings).
Every random draw is a function of (seed, IPC index, chunk, iteration), never of scheduling, so the
same plan comes out on any number of devices and after any number of restarts.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import numpy as np

from prism_jax import errors
from prism_jax.recover import schedule, selection
from prism_jax.train import precision

# Settings that change how a recovery runs, never what it makes (not in the fingerprint).
EXECUTION_FIELDS = ("units_per_device", "iterations_per_call", "checkpoint_every_iterations",
                    "sequential_teachers", "remat", "teacher_pieces", "teacher_gating", "export_jpeg")


def selection_spec(rc) -> selection.SelectionSpec:
  spec = selection.SelectionSpec(
      logit_teacher=rc.logit_teacher, bn_primary=rc.bn_primary or rc.logit_teacher,
      bn_pool=tuple(rc.bn_pool), distribution=rc.distribution, k_max=rc.k_max, p=rc.p,
      include_primary=rc.include_primary, fixed_teachers=tuple(rc.fixed_teachers),
      logit_pool=tuple(rc.logit_pool))
  spec.validate()
  if rc.strategy not in selection.STRATEGIES:
    raise errors.ConfigError(f"recover.strategy={rc.strategy!r}: expected one of {selection.STRATEGIES}")
  if rc.granularity not in selection.GRANULARITIES:
    raise errors.ConfigError(f"recover.granularity={rc.granularity!r}: expected one of {selection.GRANULARITIES}")
  if rc.init not in ("real", "noise"):
    raise errors.ConfigError(f"recover.init={rc.init!r}: expected 'real' or 'noise'")
  return spec


def teacher_order(spec: selection.SelectionSpec) -> tuple[str, ...]:
  """One canonical teacher order for the whole job: one compiled program serves every wave, and a
  unit's gradient sums teachers in the same order whatever wave it lands in."""
  return tuple(dict.fromkeys(spec.all_logit_teachers() + spec.all_bn_teachers()))


def parse_teacher_pieces(text: str, order) -> tuple[int, ...]:
  """'name=n,name=n' -> pieces per teacher in `order` (1 for teachers not named)."""
  pieces = dict.fromkeys(order, 1)
  for item in filter(None, (part.strip() for part in str(text or "").split(","))):
    name, _, count = item.partition("=")
    name = name.strip()
    if name not in pieces:
      raise errors.ConfigError(f"recover.teacher_pieces={text!r}: '{name}' is not a teacher of this recovery "
                               f"(teachers: {', '.join(order)})")
    try:
      pieces[name] = int(count)
    except ValueError:
      pieces[name] = 0
    if pieces[name] < 1:
      raise errors.ConfigError(f"recover.teacher_pieces={text!r}: expected 'name=n' items with n >= 1, got "
                               f"{item!r}")
  return tuple(pieces[name] for name in order)


def teacher_gating(rc) -> str:
  """'static' (host-driven iterations, no conditionals: CPU) or 'cond' (device loop: accelerators)."""
  gating = rc.teacher_gating
  if gating == "auto":
    gating = "static" if jax.default_backend() == "cpu" else "cond"
  if gating not in ("static", "cond"):
    raise errors.ConfigError(f"recover.teacher_gating={rc.teacher_gating!r}: expected 'auto', 'static' or 'cond'")
  if gating == "static" and not rc.sequential_teachers:
    gating = "cond"  # the naive baseline evaluates every teacher anyway
  return gating


def jitter_pixels(rc, image_size: int) -> int:
  return rc.jitter if rc.jitter >= 0 else max(1, (32 * image_size) // 224)  # 32 at 224 px, 4 at 32 px


def validate(rc, prefix: str = "recover") -> None:
  """Every check of the settings that needs no data (ConfigError naming the field)."""
  spec = selection_spec(rc)
  parse_teacher_pieces(rc.teacher_pieces, teacher_order(spec))
  teacher_gating(rc)
  if rc.ipc <= rc.ipc_start or rc.ipc_start < 0:
    raise errors.ConfigError(f"{prefix}.ipc={rc.ipc} must be larger than {prefix}.ipc_start={rc.ipc_start} (>= 0)")
  for field in ("classes_per_batch", "units_per_device", "iterations", "iterations_per_call", "iteration_period"):
    if rc[field] < 1:
      raise errors.ConfigError(f"{prefix}.{field}={rc[field]!r}: expected an integer >= 1")
  if rc.iteration_step < 0:
    raise errors.ConfigError(f"{prefix}.iteration_step={rc.iteration_step!r}: expected >= 0")
  if rc.checkpoint_every_iterations < 0:
    raise errors.ConfigError(f"{prefix}.checkpoint_every_iterations={rc.checkpoint_every_iterations!r}: "
                             "expected 0 (off) or a positive interval")
  for field in ("learning_rate", "r_bn", "first_bn_multiplier", "tv_weight", "l2_weight"):
    value = float(rc[field])
    if not math.isfinite(value) or value < 0 or (field == "learning_rate" and value == 0):
      raise errors.ConfigError(f"{prefix}.{field}={rc[field]!r}: expected a finite number "
                               f"{'> 0' if field == 'learning_rate' else '>= 0'}")
  low, high = (float(s) for s in rc.rrc_scale)
  if not 0 < low <= high <= 1:
    raise errors.ConfigError(f"{prefix}.rrc_scale={tuple(rc.rrc_scale)}: expected 0 < low <= high <= 1")


def fingerprint(rc, config, dataset) -> dict:
  settings = {k: v for k, v in rc.to_dict().items() if k not in EXECUTION_FIELDS}
  return {"recover": settings, "seed": config.seed, "data": dataset.fingerprint(),
          **precision.resolve(config, "recover").fingerprint()}


def unit_key(seed: int, unit: schedule.Unit) -> jax.Array:
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), unit.ipc_index), unit.chunk)


def has_batch_norm(variables) -> bool:
  """Whether a teacher has BatchNorm layers (running statistics to match): read from its variables
  (only BatchNorm keeps `batch_stats`), which spares tracing its forward pass."""
  return bool(jax.tree_util.tree_leaves(dict(variables).get("batch_stats", {})))


def teacher_weights(unit: schedule.Unit, order, spec, rc, seed: int, has_bn, t_max: int):
  """(T_max, n) CE and BN weights of each teacher at each iteration for one unit."""
  ce = np.zeros((t_max, len(order)), np.float32)
  bn = np.zeros((t_max, len(order)), np.float32)
  draws = ([(unit.logit_teacher, unit.bn_teachers)] * t_max if rc.strategy == "pre" else
           [selection.intra_selection(spec, seed, unit.ipc_index, unit.chunk, t, rc.granularity)
            for t in range(min(unit.iterations, t_max))])
  for t, (logit, bn_set) in enumerate(draws):
    k = selection.bn_average_count(bn_set, has_bn, rc.count_bn_only)
    ce[t, order.index(logit)] = 1.0
    for name in bn_set:
      bn[t, order.index(name)] += rc.r_bn / k
  return ce, bn


@dataclasses.dataclass
class Plan:
  """Units, waves and teacher weights of one recovery."""
  spec: selection.SelectionSpec
  order: tuple[str, ...]
  pieces: tuple[int, ...]
  units: list
  waves: list
  width: int
  gating: str
  work: dict
  _rc: object
  _seed: int
  _has_bn: dict
  _weights: dict = dataclasses.field(default_factory=dict)

  @property
  def max_iterations(self) -> int:
    """T of the job's longest unit: the length every wave's weight arrays are padded to."""
    return max(u.iterations for u in self.units)

  def unit_weights(self, unit):
    """(T, n) CE and BN teacher weights of `unit` (computed once, when first asked for)."""
    if unit not in self._weights:
      self._weights[unit] = teacher_weights(unit, self.order, self.spec, self._rc, self._seed, self._has_bn,
                                            unit.iterations)
    return self._weights[unit]


def make_plan(rc, seed: int, num_classes: int, num_devices: int, has_bn: dict) -> Plan:
  """Units (one per IPC index and class chunk), their waves over `num_devices` devices, the teacher
  weights of every unit and iteration, and the useful-work accounting."""
  spec = selection_spec(rc)
  order = teacher_order(spec)
  pieces = parse_teacher_pieces(rc.teacher_pieces, order)
  iterations = functools.partial(schedule.iterations_for, base=rc.iterations, step=rc.iteration_step,
                                 period=rc.iteration_period)
  if rc.strategy == "pre":
    select = lambda i, c: selection.pre_selection(spec, seed, i, c, rc.granularity)
  else:  # intra: every unit may use any teacher of the pools at some iteration
    select = lambda i, c: (spec.logit_teacher, spec.all_bn_teachers())
  units = schedule.make_units(num_classes, rc.ipc, rc.classes_per_batch, select, iterations,
                              ipc_start=rc.ipc_start)
  plan = Plan(spec, order, pieces, units, [], num_devices * rc.units_per_device, teacher_gating(rc), {},
              rc, seed, has_bn)

  def needed(u):  # teacher-iterations the unit really uses
    if rc.strategy == "pre":
      return schedule.default_cost(u)
    ce, bn = plan.unit_weights(u)
    return float(np.count_nonzero((ce > 0) | (bn > 0)))

  def group_cost(members, rows):  # teacher-iterations a device executes (see schedule.useful_work)
    if not rc.sequential_teachers:  # every teacher, every row, up to the longest unit
      return float(rows * len(order) * max(u.iterations for u in members))
    if rc.strategy == "pre":
      return schedule.vmapped_group_cost(members, rows)
    used = np.zeros((max(u.iterations for u in members), len(order)), bool)
    for u in members:
      ce, bn = plan.unit_weights(u)
      used[:ce.shape[0]] |= (ce > 0) | (bn > 0)
    return float(rows * np.count_nonzero(used))

  plan.waves = schedule.plan_waves(units, plan.width, cost=needed, rows_per_device=rc.units_per_device)
  plan.work = schedule.useful_work(plan.waves, num_devices, cost=needed, group_cost=group_cost,
                                   wave_wide=plan.gating == "static")
  return plan
