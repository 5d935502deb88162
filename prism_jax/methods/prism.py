"""PRISM and its relatives (SRe2L, intra-distillation, the paper's Table 2 rows) as methods: the
recover engine (prism_jax/recover/) driven over all IPC indices and class chunks (SPEC 4).

Method 'recover' uses `config.recover` as it is; every other name applies its preset
(schema/presets.py) on top of `config.recover` first. Units are recovery batches (one IPC index x one
class chunk), run in waves over the devices by recover/runner.py, which keeps finished waves and
mid-wave checkpoints so a killed run resumes where it stopped with the same images.

Multi-process runs (one mesh over all processes' devices): each process feeds, runs and saves only
its rows of every wave, and resumes from its own wave files. After each wave the rows are
all-gathered, so process 0 writes the exported set without reading other processes' files: the
work directories need not be shared for this method (later stages read the exported set).
"""

from __future__ import annotations

import contextlib
import copy
import time
import warnings

import numpy as np

from prism_jax import errors
from prism_jax.data import stats as data_stats
from prism_jax.io import monitoring, preemption, teacher_store
from prism_jax.methods import base
from prism_jax.parallel import mesh as mesh_lib, multihost
from prism_jax.recover import export, runner
from prism_jax.recover import plan as plan_lib
from prism_jax.schema import presets
from prism_jax.train import precision

METHOD_NAMES = ("recover",) + presets.RECOVER_METHODS
SUMMARY_IMAGES = 8  # TensorBoard shows this many images (classes) of each wave's first unit


@contextlib.contextmanager
def _releasing_programs():
  """The recovery's compiled programs are released when it ends (runner.MAX_LIVE_PROGRAMS)."""
  try:
    yield
  finally:
    runner.release_programs()


class RecoverMethod(base.Method):
  description = "PRISM-family recovery (BN-statistics matching with teacher selection)"

  def __init__(self, name: str):
    self.name = name

  def default_settings(self, config):
    settings = copy.deepcopy(config.recover)
    if self.name != "recover":
      for field, value in presets.recover_method_delta(self.name).items():
        settings[field] = value
    return settings

  def validate(self, settings, config, field):
    if "teachers_dir" in settings:
      raise errors.ConfigError(f"{field}.teachers_dir: moved to config.teachers_dir (one teachers directory for "
                               "every stage); set --config.teachers_dir instead")
    try:
      plan_lib.validate(settings, prefix="recover")
    except errors.ConfigError as e:
      if field == "recover":
        raise
      raise errors.ConfigError(f"{field}: {e} (this set's settings are config.recover with the "
                               f"'{self.name}' preset and {field} on top)") from None

  def fingerprint(self, ctx):
    return plan_lib.fingerprint(ctx.settings, ctx.config, ctx.dataset)

  def plan(self, ctx):
    rc, dataset = ctx.settings, ctx.dataset
    if rc.init == "real":
      per_class = [len(ix) for ix in dataset.class_indices("train")]
      smallest = int(np.argmin(per_class))
      if rc.ipc > per_class[smallest]:
        raise errors.ConfigError(
            f"{ctx.request.field}.ipc={rc.ipc} with {ctx.request.field}.init='real' needs {rc.ipc} training "
            f"images per class, but class {smallest} ('{dataset.class_names[smallest]}') has only "
            f"{per_class[smallest]}")
    order = plan_lib.teacher_order(plan_lib.selection_spec(rc))
    teachers = teacher_store.load_teacher_set(
        order, ctx.teachers_dir, class_names=dataset.class_names, needed_by=f"the {ctx.request.field} config",
        dtype=precision.resolve(ctx.config, "recover").compute_dtype)
    has_bn = {n: plan_lib.has_batch_norm(v) for n, v in zip(teachers.names, teachers.variables)}
    spec = plan_lib.selection_spec(rc)
    bn_candidates = spec.all_bn_teachers()
    bn_less = [t for t in bn_candidates if not has_bn[t]]
    if len(bn_less) == len(bn_candidates):
      raise errors.ConfigError(f"{ctx.request.field}: every BN teacher candidate {bn_candidates} has no BatchNorm "
                               "layer; the BN prior would be empty (set bn_primary / bn_pool)")
    if bn_less:
      warnings.warn(f"recover: {bn_less} have no BatchNorm layers; drawn as BN teachers they add 0 to the "
                    f"BN term{'' if rc.count_bn_only else ' but still count in K (official PRISM behaviour)'}")
    plan = plan_lib.make_plan(rc, ctx.config.seed, dataset.num_classes, ctx.mesh.devices.size, has_bn)
    return plan, teachers

  def run(self, ctx, planned):
    plan, teachers = planned
    rc, config, dataset, mesh = ctx.settings, ctx.config, ctx.dataset, ctx.mesh
    print(f"[{ctx.tag}] {len(plan.units)} recovery batches ({rc.ipc - rc.ipc_start} IPC x "
          f"{-(-dataset.num_classes // rc.classes_per_batch)} chunks) in {len(plan.waves)} waves of {plan.width} "
          f"on {mesh.devices.size} device(s); teachers {plan.order} ({plan.gating} gating); useful-work fraction "
          f"{plan.work['useful_fraction']:.3f}, device occupancy {plan.work['device_occupancy']:.3f}", flush=True)
    writer = monitoring.create_writer(ctx.tensorboard_dir)
    mean, std = dataset.mean, dataset.std
    low, high = data_stats.pixel_bounds(mean, std)
    start = time.perf_counter()
    records = []  # (unit, images, final CE, final BN, seconds) of every unit; kept on process 0 only
    total_iters = sum(w.iterations for w in plan.waves)
    progress = monitoring.Progress(ctx.tag, total_iters, unit="wave-iteration",
                                   items_per_step=plan.width * rc.classes_per_batch, item_unit="img-it",
                                   interval_s=config.progress_interval_s)
    # Placed once for the whole job (inside run_wave, processes do not move in step: see there).
    teacher_vars = mesh_lib.replicate(teachers.variables, mesh)
    done_iters = 0
    with preemption.watch(), _releasing_programs():  # SIGTERM: the running wave saves its iteration
      for wave in plan.waves:
        local = runner.run_wave(wave, plan, rc, config.seed, dataset, teachers.models, teacher_vars, mesh,
                                ctx.out_dir, low=tuple(map(float, low)), high=tuple(map(float, high)),
                                progress=progress, progress_offset=done_iters, writer=writer)
        done_iters += wave.iterations
        # Every process's rows reach every process: each can name a failed unit, and process 0
        # exports the whole set without reading other processes' wave files.
        rows = multihost.gather_global_batch(local, wave.width, mesh)
        runner.raise_if_nonfinite(wave, rows, ctx.out_dir)
        if multihost.is_main_process():
          records += [(u, rows["images"][j], float(rows["last_ce"][j]), float(rows["last_bn"][j]),
                       float(rows["seconds"][j])) for j, u in enumerate(wave.units)]
          first_unit = rows["images"][0][:SUMMARY_IMAGES]
          writer.write_images(done_iters, {"recover/images": export.to_uint8(first_unit, mean, std)})

    num_images = sum(len(u.classes) for u in plan.units)
    meta = {"num_images": num_images, "num_units": len(plan.units), "num_waves": len(plan.waves),
            "useful_work": plan.work, "class_names": list(dataset.class_names)}
    if multihost.is_main_process():
      runner.export_set(records, ctx.out_dir, dataset, rc, config.seed)
      meta["wall_seconds_last_run"] = time.perf_counter() - start
    writer.flush()
    return meta
