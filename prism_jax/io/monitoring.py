"""TensorBoard writing (clu metric writers) and terminal progress with rate and ETA."""

from __future__ import annotations

import sys
import time

import jax
from clu import metric_writers


def create_writer(logdir: str) -> metric_writers.MetricWriter:
  """TensorBoard + log writer on process 0; other processes only log (clu's convention).

  `logdir` may be local or any URL TensorFlow's file systems know (gs://, ram://). The writers are
  the ones `metric_writers.create_default_writer(logdir, asynchronous=False)` builds, made here
  because that function parses `logdir` with etils.epath, which knows only gs/s3/az/hf URLs.
  """
  writers = [metric_writers.LoggingWriter()]
  if jax.process_index() == 0:
    writers.append(metric_writers.SummaryWriter(logdir))
  return metric_writers.MultiWriter(writers)


def format_duration(seconds: float) -> str:
  seconds = max(0, int(round(seconds)))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
  """Prints `[name] step k/N (p%) | rate | ETA | metrics` at most every `interval_s` seconds.

  The rate counts only work done in this process's lifetime, so a resumed run reports an honest
  ETA instead of one inflated by the steps it skipped.
  """

  def __init__(self, name: str, total: int, *, start: int = 0, unit: str = "step",
               items_per_step: float = 1.0, item_unit: str = "img", interval_s: float = 10.0,
               stream=None):
    self.name, self.total, self.unit = name, total, unit
    self.items_per_step, self.item_unit = items_per_step, item_unit
    self.interval_s = interval_s
    self.stream = stream or sys.stdout
    self._start_step, self._start_time = start, time.perf_counter()
    self._last_print = -float("inf")
    self.enabled = jax.process_index() == 0

  def rate(self, step: int) -> float:
    elapsed = time.perf_counter() - self._start_time
    return (step - self._start_step) / elapsed if elapsed > 0 else 0.0

  def update(self, step: int, metrics: dict | None = None, force: bool = False) -> None:
    now = time.perf_counter()
    if not self.enabled or (not force and now - self._last_print < self.interval_s):
      return
    self._last_print = now
    steps_per_s = self.rate(step)
    eta = (self.total - step) / steps_per_s if steps_per_s > 0 else float("nan")
    parts = [f"[{self.name}] {self.unit} {step}/{self.total} ({100.0 * step / max(self.total, 1):.1f}%)"]
    if steps_per_s > 0:
      parts.append(f"{steps_per_s * self.items_per_step:.1f} {self.item_unit}/s")
      parts.append(f"ETA {format_duration(eta)}")
    for k, v in (metrics or {}).items():
      parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    print(" | ".join(parts), file=self.stream, flush=True)
