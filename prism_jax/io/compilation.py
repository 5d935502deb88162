"""JAX's persistent compilation cache, and a count of what this process spent compiling.

A rerun of a config (or a second experiment with the same shapes) compiles the same XLA programs:
with the cache on, they are read from disk instead. The CLI turns it on by default
(`--compilation_cache_dir`, default `$XDG_CACHE_HOME/prism_jax/jax_cache`, i.e.
`~/.cache/prism_jax/jax_cache`; an empty value turns it off; `JAX_COMPILATION_CACHE_DIR` in the
environment wins over the default). Every program is cached, however fast it compiled: on a small
CPU machine most programs compile in under JAX's default 1 s threshold, yet together they are
minutes.

`CompileStats` listens to JAX's monitoring events and reports programs compiled, compile seconds
(tracing, lowering and XLA compilation) and persistent-cache hits, so a run's log says what
compilation cost and the benchmarks can measure it.
"""

from __future__ import annotations

import os
import threading

import jax

from prism_jax import errors

_TRACE = "/jax/core/compile/jaxpr_trace_duration"
_LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_BACKEND = "/jax/core/compile/backend_compile_duration"  # XLA compilation, or a cache read
_CACHE_HIT = "/jax/compilation_cache/cache_hits"
_CACHE_REQUEST = "/jax/compilation_cache/compile_requests_use_cache"


def default_cache_dir() -> str:
  """$JAX_COMPILATION_CACHE_DIR if set, else $XDG_CACHE_HOME/prism_jax/jax_cache (~/.cache/...)."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "prism_jax", "jax_cache")


def enable_persistent_cache(directory: str) -> str | None:
  """Points JAX's persistent compilation cache at `directory` (local or gs://) and caches every
  program; '' or 'none' turns the cache off. Must run before the first compilation. Returns the
  directory in use, or None when off."""
  directory = (directory or "").strip()
  if directory.lower() in ("", "none", "off"):
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  if "://" not in directory:
    directory = os.path.abspath(os.path.expanduser(directory))
    try:
      os.makedirs(directory, exist_ok=True)
    except OSError as e:
      raise errors.ConfigError(f"--compilation_cache_dir={directory}: cannot create the directory ({e.strerror}); "
                       "pass another directory, or an empty value to turn the cache off") from None
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return directory


class CompileStats:
  """Sums this process's compilation events from the moment it is created (JAX has no way to
  unregister a listener, so create one per process, e.g. in main)."""

  def __init__(self):
    self._lock = threading.Lock()
    self.trace_s = self.lower_s = self.backend_s = 0.0
    self.programs = self.cache_requests = self.cache_hits = 0
    jax.monitoring.register_event_duration_secs_listener(self._on_duration)
    jax.monitoring.register_event_listener(self._on_event)

  def _on_duration(self, event: str, duration: float, **kwargs) -> None:
    with self._lock:
      if event == _TRACE:
        self.trace_s += duration
      elif event == _LOWER:
        self.lower_s += duration
      elif event == _BACKEND:
        self.backend_s += duration
        self.programs += 1

  def _on_event(self, event: str, **kwargs) -> None:
    with self._lock:
      if event == _CACHE_HIT:
        self.cache_hits += 1
      elif event == _CACHE_REQUEST:
        self.cache_requests += 1

  @property
  def compile_s(self) -> float:
    """Tracing + lowering + XLA compilation (or cache reads) so far."""
    return self.trace_s + self.lower_s + self.backend_s

  def as_dict(self) -> dict:
    return dict(programs=self.programs, compile_s=round(self.compile_s, 3), trace_s=round(self.trace_s, 3),
                lower_s=round(self.lower_s, 3), backend_compile_s=round(self.backend_s, 3),
                cache_requests=self.cache_requests, cache_hits=self.cache_hits)

  def summary(self, cache_enabled: bool | None = None) -> str:
    """One line; `cache_enabled` (default: whether any program asked the cache) picks the wording."""
    enabled = self.cache_requests > 0 if cache_enabled is None else cache_enabled
    cache = (f", {self.cache_hits} of them read from the persistent cache" if enabled else
             " (persistent cache off)")
    return (f"compilation: {self.programs} program(s), {self.compile_s:.1f} s "
            f"(trace {self.trace_s:.1f} s, lower {self.lower_s:.1f} s, XLA {self.backend_s:.1f} s){cache}")
