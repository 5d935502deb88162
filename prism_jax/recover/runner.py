"""The recover wave runner (SPEC 4.5): runs, checkpoints and resumes this process's rows of one wave,
and writes the exported set.

Files in a recovery's directory (`out_dir`):
  waves/waveNNNNN.pP.npz          process P's rows of a finished wave (final images + per-unit
                                  losses), written atomically
  waves/waveNNNNN.pP.partial.npz  process P's mid-wave checkpoint (state + iteration)
  images/<class>/ipcNNNN.png, images.npz, manifest.jsonl, classes.json   the exported set

A killed run skips finished waves and resumes an unfinished wave from its last mid-wave checkpoint
(or from its start); the images are those of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from prism_jax.data import stats as data_stats
from prism_jax.io import artifacts, exported, fs, preemption
from prism_jax.parallel import mesh as mesh_lib
from prism_jax.recover import engine, export, schedule
from prism_jax.recover import plan as plan_lib


def export_set(records, out_dir: str, dataset, rc, seed: int) -> None:
  """Writes the exported set in (IPC index, class) order from every unit's final images;
  `records` are (unit, images, final CE, final BN, seconds) of every unit."""
  records = sorted(records, key=lambda r: (r[0].ipc_index, r[0].chunk))
  all_images, labels, ipcs, manifest = [], [], [], []
  for unit, images, ce, bn, secs in records:
    for j, cls in enumerate(unit.classes):
      all_images.append(images[j]); labels.append(cls); ipcs.append(unit.ipc_index)
      manifest.append({"class": cls, "class_name": dataset.class_names[cls], "ipc_index": unit.ipc_index,
                       "chunk": unit.chunk, "logit_teacher": unit.logit_teacher,
                       "bn_teachers": list(unit.bn_teachers), "strategy": rc.strategy,
                       "iterations": unit.iterations, "seed": seed, "final_ce": ce,
                       "final_bn": bn, "wall_seconds": secs})
  normalized = np.stack(all_images)
  mean, std = dataset.mean, dataset.std
  export.write_outputs(out_dir, export.to_uint8(normalized, mean, std), np.asarray(labels), np.asarray(ipcs),
                       dataset.class_names, manifest, export_jpeg=rc.export_jpeg,
                       jpeg_images_u8=export.to_uint8(normalized, mean, std, truncate=True))


def raise_if_nonfinite(wave: schedule.Wave, rows: dict, out_dir: str) -> None:
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
      key = jax.random.fold_in(plan_lib.unit_key(seed, unit), 1)
      out.append(np.asarray(jax.random.normal(key, (len(unit.classes), size, size, 3), jnp.float32)))
  return np.stack(out).astype(np.float32)


def run_wave(wave: schedule.Wave, plan: plan_lib.Plan, rc, seed: int, dataset, models, teacher_vars, mesh,
             out_dir: str, *, low, high, progress, progress_offset: int, writer) -> dict:
  """Runs (or loads) this process's rows of one wave.

  Returns host arrays over those rows: final `images` (rows, C, H, W, 3), `last_ce`, `last_bn`,
  `nonfinite_at` (-1, or the iteration of a non-finite loss) and `seconds` (wall time, per row).
  `models` and `teacher_vars` are the teachers in `plan.order` (the variables replicated over the mesh).
  Processes never wait for each other here (no collective: the program has no cross-device
  communication and every input is built from this process's rows), so each resumes from its
  own wave files; the caller gathers the rows afterwards.
  """
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
  # Weights padded to the longest unit of the whole job (they are only indexed at t < T_u): every
  # wave then has the same shapes, so the same programs serve all of them.
  t_pad = plan.max_iterations
  pad_to = lambda w: np.pad(w, ((0, t_pad - w.shape[0]), (0, 0)))
  wave_ce = np.stack([pad_to(plan.unit_weights(u)[0]) for u in padded])
  wave_bn = np.stack([pad_to(plan.unit_weights(u)[1]) for u in padded])
  totals, ce_w, bn_w = wave_totals[rows], wave_ce[rows], wave_bn[rows]
  labels = np.asarray([u.classes for u in local_units], np.int32)
  keys = np.stack([np.asarray(jax.random.key_data(jax.random.fold_in(plan_lib.unit_key(seed, u), 0)))
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
                  engine.init_state(jnp.asarray(initial_images(local_units, dataset, rc, seed))).items()}

  put = lambda x: mesh_lib.put_global_batch(x, wave.width, mesh)
  state = {k: put(v) for k, v in host_state.items()}
  args = [put(a) for a in (keys, labels, totals, ce_w, bn_w)]
  cfg = engine.StepConfig(
      teacher_names=plan.order, image_size=dataset.image_size, low=low, high=high,
      learning_rate=rc.learning_rate, first_bn_multiplier=rc.first_bn_multiplier,
      jitter=plan_lib.jitter_pixels(rc, dataset.image_size), rrc_scale=tuple(rc.rrc_scale), flip=rc.flip,
      tv_weight=rc.tv_weight, l2_weight=rc.l2_weight, sequential_teachers=rc.sequential_teachers,
      remat=rc.remat, teacher_pieces=plan.pieces)
  step = _compiled_step()
  static = plan.gating == "static"
  t = t0
  while t < t_max:
    stop = min(t + rc.iterations_per_call, t_max)
    if static:
      for it in range(t, stop):
        active = engine.active_teachers(wave_ce, wave_bn, wave_totals, it)
        _track_programs(engine.static_programs(active), wave.width)
        with gc_paused():
          state = engine.static_iteration(state, *args, teacher_vars, np.int32(it), models=models, cfg=cfg,
                                          mesh=mesh, active=active)
    else:
      with gc_paused():
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
    if preemption.requested() and t < t_max:  # SIGTERM: keep this iteration and stop
      artifacts.write_npz(partial_path, iteration=np.int64(t), **_host_state(state))
      raise preemption.Preempted(f"[recover] preempted (SIGTERM) in {wave.uid} at iteration {t}/{t_max}"
                                 f"{_process_tag()}: saved in {partial_path}; rerun the same command to resume")
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


def load_wave_images(out_dir: str) -> dict[tuple[int, int], np.ndarray]:
  """Final float images of every finished unit of the recovery in `out_dir`, keyed by (ipc_index, chunk)."""
  wave_dir = os.path.join(out_dir, "waves")
  out = {}
  for name in fs.listdir(wave_dir):
    if name.endswith(".npz") and ".partial" not in name:
      saved = _load_npz(os.path.join(wave_dir, name))
      for j in np.flatnonzero(saved["is_real"]):
        out[(int(saved["ipc_index"][j]), int(saved["chunk"][j]))] = saved["images"][j]
  return out


@contextlib.contextmanager
def gc_paused():
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
  """The `cond`-gating wave program, jitted, its tracing kept beside the compilation cache."""
  return exported.Program(engine.run_iterations, static_argnames=("models", "cfg", "mesh"), donate_argnums=(0,))


# Each XLA:CPU executable holds its machine code in its own memory mappings, which the kernel caps
# per process (vm.max_map_count, 65,530 by default). Static gating compiles one program per teacher
# of the pool (plus two) and wave width, so a recovery holds few; but a process that runs several
# methods, or a large pool, would keep every program of the run alive. At most MAX_LIVE_PROGRAMS are
# kept; past that the compiled programs are released (reused ones come back from the persistent
# compilation cache), and every method releases its programs when it finishes.
MAX_LIVE_PROGRAMS = 48
_LIVE: set = set()


def _track_programs(programs, width: int) -> None:
  """Notes the static programs an iteration is about to run, releasing all first when they would
  take the live programs past MAX_LIVE_PROGRAMS."""
  keys = {(p, width) for p in programs}
  if len(_LIVE | keys) > MAX_LIVE_PROGRAMS:
    release_programs()
  _LIVE.update(keys)


def release_programs() -> None:
  """Drops every compiled recovery program of this process (their executables and mappings)."""
  _LIVE.clear()
  clear = getattr(_compiled_step, "cache_clear", None)
  if clear is not None:
    clear()
  # JAX's own caches hold the executables too: only clearing them frees the mappings (measured: 5,350
  # -> 600 after 35 five-teacher programs; dropping the jit object alone frees nothing).
  jax.clear_caches()
