"""Recover stage: PRISM image synthesis over all IPC indices and class chunks (SPEC 4).

Work directory layout (`<workdir>/recover/`):
  waves/waveNNNNN.pP.npz          process P's rows of a finished wave (final images + per-unit
                                  losses), written atomically
  waves/waveNNNNN.pP.partial.npz  process P's mid-wave checkpoint (state + iteration)
  images/<class>/ipcNNNN.png, images.npz, manifest.jsonl, classes.json   the exported set
  recover.json                    completion marker: fingerprint, timing, useful-work fraction

A killed run skips finished waves, resumes an unfinished wave from its last mid-wave checkpoint
(or from the start), and ends with the same images as an uninterrupted run: every random draw is
a function of (seed, IPC index, chunk, iteration), never of scheduling.

Multi-process runs (one mesh over all processes' devices): each process feeds, runs and saves
only its rows of every wave, and resumes from its own wave files. After each wave the rows are
all-gathered over the devices, so process 0 writes the exported set, the completion marker and
the TensorBoard summaries without reading other processes' files: the work directories need not
be shared (later stages read the exported set, so there they must be, or be copied).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import os
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from prism_jax.data import sources
from prism_jax.data import stats as data_stats
from prism_jax.io import artifacts, fs, monitoring, teacher_store
from prism_jax.models import bn_stats
from prism_jax.parallel import mesh as mesh_lib, multihost
from prism_jax.recover import engine, export, schedule, selection
from prism_jax.train import precision

STAGE_DIR = "recover"
DONE_FILE = "recover.json"
SUMMARY_IMAGES = 8  # TensorBoard shows this many images (classes) of each wave's first unit
_EXECUTION_FIELDS = ("units_per_device", "iterations_per_call", "checkpoint_every_iterations",
                     "sequential_teachers", "remat", "teacher_pieces", "teacher_gating", "export_jpeg",
                     "teachers_dir")


def stage_dir(workdir: str) -> str:
  return os.path.join(workdir, STAGE_DIR)


def selection_spec(rc) -> selection.SelectionSpec:
  spec = selection.SelectionSpec(
      logit_teacher=rc.logit_teacher, bn_primary=rc.bn_primary or rc.logit_teacher,
      bn_pool=tuple(rc.bn_pool), distribution=rc.distribution, k_max=rc.k_max, p=rc.p,
      include_primary=rc.include_primary, fixed_teachers=tuple(rc.fixed_teachers),
      logit_pool=tuple(rc.logit_pool))
  spec.validate()
  if rc.strategy not in selection.STRATEGIES:
    raise ValueError(f"recover.strategy={rc.strategy!r}: expected one of {selection.STRATEGIES}")
  if rc.granularity not in selection.GRANULARITIES:
    raise ValueError(f"recover.granularity={rc.granularity!r}: expected one of {selection.GRANULARITIES}")
  if rc.init not in ("real", "noise"):
    raise ValueError(f"recover.init={rc.init!r}: expected 'real' or 'noise'")
  return spec


def parse_teacher_pieces(text: str, order) -> tuple[int, ...]:
  """'name=n,name=n' -> pieces per teacher in `order` (1 for teachers not named)."""
  pieces = dict.fromkeys(order, 1)
  for item in filter(None, (part.strip() for part in str(text or "").split(","))):
    name, _, count = item.partition("=")
    name = name.strip()
    if name not in pieces:
      raise ValueError(f"recover.teacher_pieces={text!r}: '{name}' is not a teacher of this recovery "
                       f"(teachers: {', '.join(order)})")
    try:
      pieces[name] = int(count)
    except ValueError:
      pieces[name] = 0
    if pieces[name] < 1:
      raise ValueError(f"recover.teacher_pieces={text!r}: expected 'name=n' items with n >= 1, got "
                       f"{item!r}")
  return tuple(pieces[name] for name in order)


def teacher_gating(rc) -> str:
  """'static' (host-driven iterations, no conditionals: CPU) or 'cond' (device loop: accelerators)."""
  gating = rc.teacher_gating
  if gating == "auto":
    gating = "static" if jax.default_backend() == "cpu" else "cond"
  if gating not in ("static", "cond"):
    raise ValueError(f"recover.teacher_gating={rc.teacher_gating!r}: expected 'auto', 'static' or 'cond'")
  if gating == "static" and not rc.sequential_teachers:
    gating = "cond"  # the naive baseline evaluates every teacher anyway
  return gating


def jitter_pixels(rc, image_size: int) -> int:
  return rc.jitter if rc.jitter >= 0 else max(1, (32 * image_size) // 224)  # 32 at 224 px, 4 at 32 px


def fingerprint(config, dataset) -> dict:
  rc = {k: v for k, v in config.recover.to_dict().items() if k not in _EXECUTION_FIELDS}
  return {"recover": rc, "seed": config.seed, "data": dataset.fingerprint(),
          **precision.resolve(config, "recover").fingerprint()}


@dataclasses.dataclass
class Teachers:
  models: dict
  variables: dict
  has_bn: dict


def load_teachers(names, teachers_dir: str, dataset, dtype=jnp.float32) -> Teachers:
  models, variables, has_bn = {}, {}, {}
  for name in names:
    path = os.path.join(teachers_dir, name)
    if not teacher_store.is_complete(path):
      raise artifacts.ArtifactError(
          f"{path}: no teacher '{name}' (needed by the recover config); train it with the squeeze "
          f"stage (--config.stage=squeeze --config.squeeze.teachers=\"('{name}',)\") or import "
          "torchvision weights with `python -m prism_jax.tools.import_torchvision`")
    model, var, _ = teacher_store.load_teacher(path, expected_class_names=dataset.class_names, dtype=dtype)
    models[name], variables[name] = model, var
    images = jax.ShapeDtypeStruct((2, dataset.image_size, dataset.image_size, 3), jnp.float32)
    out = jax.eval_shape(functools.partial(bn_stats.forward_with_bn_stats, model), var, images)
    has_bn[name] = len(out.bn) > 0
  return Teachers(models, variables, has_bn)


def _unit_key(seed: int, unit: schedule.Unit) -> jax.Array:
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), unit.ipc_index), unit.chunk)


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


def run(config, workdir: str, mesh) -> dict:
  rc = config.recover
  out_dir = stage_dir(workdir)
  dataset = sources.open_dataset(config.data)
  fp = fingerprint(config, dataset)
  done_path = os.path.join(out_dir, DONE_FILE)
  # Process 0's marker decides for every process (their work directories need not be shared).
  meta, refused = None, None
  if multihost.is_main_process() and fs.exists(done_path):
    meta = artifacts.read_json(done_path)
    try:
      artifacts.check_same("the recovered set", done_path, fp, meta["fingerprint"])
    except artifacts.ArtifactError as e:
      refused = e
  status = multihost.broadcast_from_main(0 if meta is None else 2 if refused else 1)
  if status == 2:
    raise refused or artifacts.ArtifactError(
        f"{done_path}: process 0 holds a finished recovery made with another config (see its error)")
  if status == 1:
    if meta is None and fs.exists(done_path):
      meta = artifacts.read_json(done_path)
    if meta is None:  # this process cannot see process 0's work directory
      print(f"[recover] already done (process 0's {done_path})", flush=True)
      return {"fingerprint": fp}
    print(f"[recover] already done: {meta['num_images']} images in {out_dir}", flush=True)
    return meta
  spec = selection_spec(rc)
  if rc.ipc <= rc.ipc_start:
    raise ValueError(f"recover.ipc={rc.ipc} must be larger than recover.ipc_start={rc.ipc_start}")
  if rc.classes_per_batch < 1:
    raise ValueError(f"recover.classes_per_batch={rc.classes_per_batch}: expected >= 1")
  if rc.init == "real":
    per_class = [len(ix) for ix in dataset.class_indices("train")]
    smallest = int(np.argmin(per_class))
    if rc.ipc > per_class[smallest]:
      raise ValueError(f"recover.ipc={rc.ipc} with recover.init='real' needs {rc.ipc} training images "
                       f"per class, but class {smallest} ('{dataset.class_names[smallest]}') has only "
                       f"{per_class[smallest]}")
  fs.makedirs(os.path.join(out_dir, "waves"))
  run_path = os.path.join(out_dir, "run.json")
  if fs.exists(run_path):
    artifacts.check_same("the recovery in progress", run_path, fp, artifacts.read_json(run_path))
  elif jax.process_index() == 0:
    artifacts.write_json(run_path, fp)

  teachers_dir = rc.teachers_dir or os.path.join(workdir, "teachers")
  # One canonical teacher order for the whole job: one compiled program serves every wave, and a
  # unit's gradient sums teachers in the same order whatever wave it lands in.
  order = tuple(dict.fromkeys(spec.all_logit_teachers() + spec.all_bn_teachers()))
  pieces = parse_teacher_pieces(rc.teacher_pieces, order)
  if rc.units_per_device < 1:
    raise ValueError(f"recover.units_per_device={rc.units_per_device}: expected >= 1")
  teachers = load_teachers(order, teachers_dir, dataset, dtype=precision.resolve(config, "recover").compute_dtype)
  bn_candidates = spec.all_bn_teachers()
  bn_less = [t for t in bn_candidates if not teachers.has_bn[t]]
  if len(bn_less) == len(bn_candidates):
    raise ValueError(f"recover: every BN teacher candidate {bn_candidates} has no BatchNorm layer; "
                     "the BN prior would be empty (set recover.bn_primary / recover.bn_pool)")
  if bn_less:
    warnings.warn(f"recover: {bn_less} have no BatchNorm layers; drawn as BN teachers they add 0 to the "
                  f"BN term{'' if rc.count_bn_only else ' but still count in K (official PRISM behaviour)'}")

  iterations = functools.partial(schedule.iterations_for, base=rc.iterations, step=rc.iteration_step,
                                 period=rc.iteration_period)
  if rc.strategy == "pre":
    select = lambda i, c: selection.pre_selection(spec, config.seed, i, c, rc.granularity)
  else:  # intra: every unit may use any teacher of the pools at some iteration
    select = lambda i, c: (spec.logit_teacher, spec.all_bn_teachers())
  units = schedule.make_units(dataset.num_classes, rc.ipc, rc.classes_per_batch, select, iterations,
                              ipc_start=rc.ipc_start)
  weights_cache: dict = {}

  def unit_weights(u):
    if u not in weights_cache:
      weights_cache[u] = teacher_weights(u, order, spec, rc, config.seed, teachers.has_bn, u.iterations)
    return weights_cache[u]

  def needed(u):  # teacher-iterations the unit really uses
    if rc.strategy == "pre":
      return schedule.default_cost(u)
    ce, bn = unit_weights(u)
    return float(np.count_nonzero((ce > 0) | (bn > 0)))

  def group_cost(members, rows):  # teacher-iterations a device executes (see schedule.useful_work)
    if not rc.sequential_teachers:  # every teacher, every row, up to the longest unit
      return float(rows * len(order) * max(u.iterations for u in members))
    if rc.strategy == "pre":
      return schedule.vmapped_group_cost(members, rows)
    used = np.zeros((max(u.iterations for u in members), len(order)), bool)
    for u in members:
      ce, bn = unit_weights(u)
      used[:ce.shape[0]] |= (ce > 0) | (bn > 0)
    return float(rows * np.count_nonzero(used))

  width = mesh.devices.size * rc.units_per_device
  waves = schedule.plan_waves(units, width, cost=needed, rows_per_device=rc.units_per_device)
  gating = teacher_gating(rc)
  work = schedule.useful_work(waves, mesh.devices.size, cost=needed, group_cost=group_cost,
                              wave_wide=gating == "static")
  print(f"[recover] {len(units)} recovery batches ({rc.ipc - rc.ipc_start} IPC x "
        f"{-(-dataset.num_classes // rc.classes_per_batch)} chunks) in {len(waves)} waves of {width} "
        f"on {mesh.devices.size} device(s); teachers {order} ({gating} gating); useful-work fraction "
        f"{work['useful_fraction']:.3f}, device occupancy {work['device_occupancy']:.3f}", flush=True)

  writer = monitoring.create_writer(os.path.join(workdir, "tensorboard", "recover"))
  mean, std = dataset.mean, dataset.std
  low, high = data_stats.pixel_bounds(mean, std)
  start = time.perf_counter()
  records = []  # (unit, images, final CE, final BN, seconds) of every unit; kept on process 0 only
  total_iters = sum(w.iterations for w in waves)
  progress = monitoring.Progress("recover", total_iters, unit="wave-iteration",
                                 items_per_step=width * rc.classes_per_batch, item_unit="img-it",
                                 interval_s=config.progress_interval_s)
  # Placed once for the whole job (inside run_wave, processes do not move in step: see there).
  teacher_vars = mesh_lib.replicate(tuple(teachers.variables[n] for n in order), mesh)
  done_iters = 0
  for wave in waves:
    local = run_wave(wave, order, pieces, unit_weights, config, dataset, teachers, teacher_vars, mesh, out_dir,
                     low=tuple(map(float, low)), high=tuple(map(float, high)),
                     progress=progress, progress_offset=done_iters, writer=writer)
    done_iters += wave.iterations
    # Every process's rows reach every process: each can name a failed unit, and process 0
    # exports the whole set without reading other processes' wave files.
    rows = multihost.gather_global_batch(local, wave.width, mesh)
    _raise_if_nonfinite(wave, rows, out_dir)
    if multihost.is_main_process():
      records += [(u, rows["images"][j], float(rows["last_ce"][j]), float(rows["last_bn"][j]),
                   float(rows["seconds"][j])) for j, u in enumerate(wave.units)]
      first_unit = rows["images"][0][:SUMMARY_IMAGES]
      writer.write_images(done_iters, {"recover/images": export.to_uint8(first_unit, mean, std)})

  num_images = sum(len(u.classes) for u in units)
  meta = {"fingerprint": fp, "num_images": num_images, "num_units": len(units),
          "num_waves": len(waves), "useful_work": work, "class_names": list(dataset.class_names)}
  if multihost.is_main_process():
    _export(records, out_dir, dataset, config)
    meta["wall_seconds_last_run"] = time.perf_counter() - start
    artifacts.write_json(done_path, meta)
  writer.flush()
  multihost.barrier("recover: exported")  # no process moves on before the set is written
  if multihost.is_main_process():
    print(f"[recover] {num_images} images -> {out_dir}", flush=True)
  return meta


def _export(records, out_dir: str, dataset, config) -> None:
  """Writes the exported set in (IPC index, class) order from every unit's final images."""
  rc = config.recover
  records = sorted(records, key=lambda r: (r[0].ipc_index, r[0].chunk))
  all_images, labels, ipcs, manifest = [], [], [], []
  for unit, images, ce, bn, secs in records:
    for j, cls in enumerate(unit.classes):
      all_images.append(images[j]); labels.append(cls); ipcs.append(unit.ipc_index)
      manifest.append({"class": cls, "class_name": dataset.class_names[cls], "ipc_index": unit.ipc_index,
                       "chunk": unit.chunk, "logit_teacher": unit.logit_teacher,
                       "bn_teachers": list(unit.bn_teachers), "strategy": rc.strategy,
                       "iterations": unit.iterations, "seed": config.seed, "final_ce": ce,
                       "final_bn": bn, "wall_seconds": secs})
  normalized = np.stack(all_images)
  mean, std = dataset.mean, dataset.std
  export.write_outputs(out_dir, export.to_uint8(normalized, mean, std), np.asarray(labels), np.asarray(ipcs),
                       dataset.class_names, manifest, export_jpeg=rc.export_jpeg,
                       jpeg_images_u8=export.to_uint8(normalized, mean, std, truncate=True))


def _raise_if_nonfinite(wave: schedule.Wave, rows: dict, out_dir: str) -> None:
  """Stops every process alike when any unit of the wave met a non-finite loss."""
  bad = [(j, int(rows["nonfinite_at"][j])) for j in range(len(wave.units)) if rows["nonfinite_at"][j] >= 0]
  if bad:
    j, iteration = bad[0]
    u = wave.units[j]
    raise FloatingPointError(
        f"recover: non-finite loss in {wave.uid}, recovery batch ipc_index={u.ipc_index} "
        f"chunk={u.chunk}, iteration {iteration}; finished waves are kept in "
        f"{os.path.join(out_dir, 'waves')} (lower recover.learning_rate or check the teachers)")


_STATE_KEYS = ("images", "adam_m", "adam_v", "last_ce", "last_bn", "nonfinite_at")


def _wave_path(out_dir: str, wave: schedule.Wave, partial: bool = False) -> str:
  suffix = ".partial" if partial else ""
  return os.path.join(out_dir, "waves", f"{wave.uid}.p{jax.process_index()}{suffix}.npz")


def _load_npz(path: str) -> dict:
  try:
    with fs.open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  except Exception as e:  # a truncated or corrupt file: name it, never reuse it silently
    raise artifacts.ArtifactError(f"{path}: unreadable wave file ({e}); delete it to recompute "
                                  "this wave") from None


def initial_images(units, dataset, rc, seed: int) -> np.ndarray:
  """(W, C, H, W, 3) normalized start images: real (i-th train image per class) or N(0, 1) noise."""
  size = dataset.image_size
  out = []
  class_indices = dataset.class_indices("train") if rc.init == "real" else None
  for unit in units:
    if rc.init == "real":
      idx = np.asarray([class_indices[c][unit.ipc_index] for c in unit.classes])
      out.append(data_stats.normalize(dataset.read("train", idx), dataset.mean, dataset.std))
    else:
      key = jax.random.fold_in(_unit_key(seed, unit), 1)
      out.append(np.asarray(jax.random.normal(key, (len(unit.classes), size, size, 3), jnp.float32)))
  return np.stack(out).astype(np.float32)


def run_wave(wave: schedule.Wave, order, pieces, unit_weights, config, dataset, teachers: Teachers, teacher_vars,
             mesh, out_dir: str, *, low, high, progress, progress_offset: int, writer) -> dict:
  """Runs (or loads) this process's rows of one wave.

  Returns host arrays over those rows: final `images` (rows, C, H, W, 3), `last_ce`, `last_bn`,
  `nonfinite_at` (-1, or the iteration of a non-finite loss) and `seconds` (wall time, per row).
  `teacher_vars` are the variables of the teachers in `order`, replicated over the mesh.
  Processes never wait for each other here (no collective: the program has no cross-device
  communication and every input is built from this process's rows), so each resumes from its
  own wave files; the caller gathers the rows afterwards.
  """
  rc = config.recover
  final_path = _wave_path(out_dir, wave)
  rows = mesh_lib.local_batch_slice(wave.width, mesh)
  padded = list(wave.units) + [wave.units[0]] * (wave.width - len(wave.units))
  local_units = padded[rows]
  is_real = np.asarray([rows.start + j < len(wave.units) for j in range(len(local_units))])
  if fs.exists(final_path):
    saved = _load_npz(final_path)
    return _local_result(saved, float(saved["seconds"]))

  start = time.perf_counter()
  t_max = wave.iterations
  # Every row's iteration count (0 for padding) and per-iteration teacher weights; this process
  # feeds its rows, and static gating reads the teacher sets of the whole wave (the same on
  # every process).
  wave_totals = np.asarray([u.iterations for u in wave.units] + [0] * (wave.width - len(wave.units)),
                           np.int32)
  pad_to = lambda w: np.pad(w, ((0, t_max - w.shape[0]), (0, 0)))
  wave_ce = np.stack([pad_to(unit_weights(u)[0]) for u in padded])
  wave_bn = np.stack([pad_to(unit_weights(u)[1]) for u in padded])
  totals, ce_w, bn_w = wave_totals[rows], wave_ce[rows], wave_bn[rows]
  labels = np.asarray([u.classes for u in local_units], np.int32)
  keys = np.stack([np.asarray(jax.random.key_data(jax.random.fold_in(_unit_key(config.seed, u), 0)))
                   for u in local_units])
  partial_path = _wave_path(out_dir, wave, partial=True)
  if fs.exists(partial_path):
    saved = _load_npz(partial_path)
    t0 = int(saved.pop("iteration"))
    host_state = {k: saved[k] for k in _STATE_KEYS}
    print(f"[recover] {wave.uid}: resuming at iteration {t0}/{t_max}{_process_tag()}", flush=True)
  else:
    t0 = 0
    host_state = {k: np.asarray(v) for k, v in
                  engine.init_state(jnp.asarray(initial_images(local_units, dataset, rc, config.seed))).items()}

  put = lambda x: mesh_lib.put_global_batch(x, wave.width, mesh)
  state = {k: put(v) for k, v in host_state.items()}
  args = [put(a) for a in (keys, labels, totals, ce_w, bn_w)]
  cfg = engine.StepConfig(
      teacher_names=order, image_size=dataset.image_size, low=low, high=high,
      learning_rate=rc.learning_rate, first_bn_multiplier=rc.first_bn_multiplier,
      jitter=jitter_pixels(rc, dataset.image_size), rrc_scale=tuple(rc.rrc_scale), flip=rc.flip,
      tv_weight=rc.tv_weight, l2_weight=rc.l2_weight, sequential_teachers=rc.sequential_teachers,
      remat=rc.remat, teacher_pieces=pieces)
  models = tuple(teachers.models[n] for n in order)
  step = _compiled_step()
  static = teacher_gating(rc) == "static"
  t = t0
  while t < t_max:
    stop = min(t + rc.iterations_per_call, t_max)
    if static:
      for it in range(t, stop):
        active = engine.active_teachers(wave_ce, wave_bn, wave_totals, it)
        with _gc_paused():
          state = step(state, *args, teacher_vars, np.int32(it), np.int32(it + 1), models=models,
                       cfg=cfg, mesh=mesh, active=active)
    else:
      with _gc_paused():
        state = step(state, *args, teacher_vars, np.int32(t), np.int32(stop), models=models,
                     cfg=cfg, mesh=mesh)
    previous, t = t, stop
    if (mesh_lib.fetch_local_batch(state["nonfinite_at"]) >= 0).any():
      # Keep finished waves and stop here; the caller names the unit on every process.
      return _local_result(_host_state(state), time.perf_counter() - start)
    if is_real.any():  # a process may hold only padding rows of a short wave
      ce, bn = (mesh_lib.fetch_local_batch(state[k])[is_real].mean() for k in ("last_ce", "last_bn"))
      progress.update(progress_offset + t, {"wave": wave.uid, "ce": float(ce), "bn": float(bn)},
                      force=t == t_max)
      # Process 0's units (the writer is silent elsewhere): no cross-process wait inside a wave.
      writer.write_scalars(progress_offset + t, {"recover/ce": float(ce), "recover/bn": float(bn)})
    every = rc.checkpoint_every_iterations
    if every and t < t_max and t // every > previous // every:
      artifacts.write_npz(partial_path, iteration=np.int64(t), **_host_state(state))
  host = _host_state(state)
  seconds = time.perf_counter() - start
  artifacts.write_npz(final_path, images=host["images"], last_ce=host["last_ce"], last_bn=host["last_bn"],
                      seconds=np.float64(seconds),
                      ipc_index=np.asarray([u.ipc_index for u in local_units], np.int32),
                      chunk=np.asarray([u.chunk for u in local_units], np.int32),
                      is_real=is_real)
  if fs.exists(partial_path):
    fs.remove(partial_path)
  return _local_result(host, seconds)


def _process_tag() -> str:
  return f" (process {jax.process_index()})" if jax.process_count() > 1 else ""


def _host_state(state: dict) -> dict:
  return {k: mesh_lib.fetch_local_batch(v) for k, v in state.items()}


def _local_result(saved: dict, seconds: float) -> dict:
  rows = len(saved["last_ce"])
  nonfinite = saved["nonfinite_at"] if "nonfinite_at" in saved else np.full((rows,), -1, np.int32)
  return {"images": saved["images"], "last_ce": saved["last_ce"], "last_bn": saved["last_bn"],
          "nonfinite_at": np.asarray(nonfinite, np.int32), "seconds": np.full((rows,), seconds, np.float32)}


def load_wave_images(workdir: str) -> dict[tuple[int, int], np.ndarray]:
  """Final float images of every finished unit, keyed by (ipc_index, chunk)."""
  wave_dir = os.path.join(stage_dir(workdir), "waves")
  out = {}
  for name in fs.listdir(wave_dir):
    if name.endswith(".npz") and ".partial" not in name:
      saved = _load_npz(os.path.join(wave_dir, name))
      for j in np.flatnonzero(saved["is_real"]):
        out[(int(saved["ipc_index"][j]), int(saved["chunk"][j]))] = saved["images"][j]
  return out


@contextlib.contextmanager
def _gc_paused():
  """Python's cyclic garbage collector off for the duration (then back to its previous state).

  A step call that meets a new program traces and lowers it: tens of thousands of Python objects
  (tracers, equations), whose allocation keeps triggering collections that walk the whole heap;
  with static gating (many programs) that was about half of a program's tracing time. Nothing in
  a step call needs a cycle collected, and a cached call allocates next to nothing, so every call
  runs with it paused (collection resumes after the call). No effect on any result.
  """
  enabled = gc.isenabled()
  gc.disable()
  try:
    yield
  finally:
    if enabled:
      gc.enable()


@functools.lru_cache(maxsize=None)
def _compiled_step():
  return jax.jit(engine.run_iterations, static_argnames=("models", "cfg", "mesh", "active"),
                 donate_argnums=(0,))
