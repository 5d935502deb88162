"""Generic jitted training loop shared by teacher (squeeze) and student training.

The loop owns resume, logging, evaluation and checkpointing; the caller provides a jitted
`step_fn(state, *batch, step_key) -> (state, metrics)`, a `get_batch(step)` that returns device
arrays, and an `evaluate(state) -> dict` function. Step keys are `fold_in(base_key, step)`, and the
batch is a function of the step, so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable

import jax

from prism_jax.io import artifacts, checkpoint, fs, monitoring, preemption

RUN_FILE = "run.json"


@dataclasses.dataclass(frozen=True)
class LoopSettings:
  total_steps: int
  steps_per_epoch: int
  log_every_steps: int = 50
  eval_every_steps: int = 0            # 0: only at the end
  checkpoint_every_steps: int = 500
  keep_checkpoints: int = 2
  items_per_step: int = 1               # images per step, for the throughput figure
  progress_interval_s: float = 10.0


def train_loop(*, name: str, state: Any, step_fn: Callable, get_batch: Callable[[int], tuple],
               evaluate: Callable[[Any], dict], base_key: jax.Array, settings: LoopSettings,
               checkpoint_dir: str, run_fingerprint: dict, writer, learning_rate_fn=None):
  """Runs (or resumes) training to `settings.total_steps`.

  Returns (state, eval_history, timing); timing counts only the steps run by this call, with the
  first (compiling) step apart, and excludes evaluation and checkpointing, except `seconds_total`:
  the wall time of every call that worked towards these checkpoints (kept in their metadata).
  """
  run_path = os.path.join(checkpoint_dir, RUN_FILE)
  manager = checkpoint.create_manager(checkpoint_dir, save_every_steps=settings.checkpoint_every_steps,
                                      keep=settings.keep_checkpoints)
  if fs.exists(run_path):
    artifacts.check_same("the checkpoint in progress", run_path, run_fingerprint, artifacts.read_json(run_path))
  elif jax.process_index() == 0:
    artifacts.write_json(run_path, run_fingerprint)

  start_step, state, meta = checkpoint.restore_latest(manager, state)
  history: list[dict] = list(meta.get("history", []))
  loop_start, seconds_before = time.perf_counter(), float(meta.get("seconds_total", 0.0))

  def seconds_total() -> float:
    return seconds_before + time.perf_counter() - loop_start

  def saved_meta() -> dict:
    return {"history": history, "seconds_total": seconds_total()}

  if start_step:
    print(f"[{name}] resuming from step {start_step}/{settings.total_steps}", flush=True)

  progress = monitoring.Progress(name, settings.total_steps, start=start_step,
                                 items_per_step=settings.items_per_step,
                                 interval_s=settings.progress_interval_s)
  sums: dict[str, Any] = {}
  count = 0
  window_start = time.perf_counter()
  timing = {"steps_run": 0, "train_seconds": 0.0, "first_step_seconds": 0.0}
  # Steady-state time = wall time after the first (compiling) step minus evaluation and checkpoint
  # time; dispatch is asynchronous, so only wall-clock spans that end in a sync are meaningful.
  steady_start, excluded = None, 0.0
  with preemption.watch():  # SIGTERM -> save at the next step boundary (io/preemption.py)
    for step in range(start_step, settings.total_steps):
      step_start = time.perf_counter()
      batch = get_batch(step)
      state, metrics = step_fn(state, *batch, jax.random.fold_in(base_key, step))
      if step == start_step:  # includes compilation: reported apart from the steady-state rate
        jax.block_until_ready(metrics)
        steady_start = time.perf_counter()
        timing["first_step_seconds"] = steady_start - step_start
      timing["steps_run"] += 1
      sums = metrics if not sums else jax.tree_util.tree_map(lambda a, b: a + b, sums, metrics)
      count += 1
      done = step + 1
      if done % settings.log_every_steps == 0 or done == settings.total_steps:
        means = {k: float(v) / count for k, v in jax.device_get(sums).items()}
        if not all(math.isfinite(v) for v in means.values()):
          raise FloatingPointError(f"[{name}] non-finite training metrics {means} at step {done}; "
                                   "the last checkpoint is kept (lower the learning rate?)")
        elapsed = time.perf_counter() - window_start
        means["images_per_sec"] = count * settings.items_per_step / max(elapsed, 1e-9)
        means["epoch"] = done / settings.steps_per_epoch
        if learning_rate_fn is not None:
          means["learning_rate"] = float(learning_rate_fn(step))
        writer.write_scalars(done, {f"train/{k}": v for k, v in means.items()})
        progress.update(done, {"loss": means["loss"]}, force=done == settings.total_steps)
        sums, count, window_start = {}, 0, time.perf_counter()
      else:
        progress.update(done)

      is_eval = settings.eval_every_steps and done % settings.eval_every_steps == 0
      if is_eval or done == settings.total_steps:
        jax.block_until_ready(state)
        eval_start = time.perf_counter()
        result = {k: float(v) for k, v in evaluate(state).items()}
        result.update(step=done, epoch=done / settings.steps_per_epoch)
        history.append(result)
        writer.write_scalars(done, {f"eval/{k}": v for k, v in result.items() if k not in ("step", "epoch")})
        if jax.process_index() == 0:
          print(f"[{name}] eval at step {done} (epoch {result['epoch']:.2f}): " +
                ", ".join(f"{k} {v:.4f}" for k, v in result.items() if k not in ("step", "epoch")), flush=True)
        excluded += time.perf_counter() - eval_start
      save_start = time.perf_counter()
      if checkpoint.save(manager, done, state, saved_meta(), force=done == settings.total_steps):
        saved = time.perf_counter() - save_start
        excluded += saved
        window_start += saved  # keep checkpoint time out of the img/s figure
      if preemption.requested() and jax.process_count() == 1:  # SIGTERM: save this step and stop
        if done not in manager.all_steps():
          checkpoint.save(manager, done, state, saved_meta(), force=True)
        manager.wait_until_finished()
        manager.close()
        writer.flush()
        raise preemption.Preempted(f"[{name}] preempted (SIGTERM) after step {done}/{settings.total_steps}: "
                                   f"checkpoint saved in {checkpoint_dir}; rerun the same command to resume")
  jax.block_until_ready(state)
  if steady_start is not None:
    timing["train_seconds"] = max(time.perf_counter() - steady_start - excluded, 0.0)
  timing["seconds_total"] = seconds_total()
  manager.wait_until_finished()
  writer.flush()
  manager.close()
  return state, history, timing
