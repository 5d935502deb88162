"""Preemption: SIGTERM (what Cloud VMs, SLURM and `kill` send before they stop a job) asks the running
loop to save and stop at its next step boundary instead of dying where it stands.

`watch()` installs the handler for the duration of a loop (main thread only; the previous handler
comes back afterwards); the loop polls `requested()` after each step, saves, and raises `Preempted`,
which the command line reports in one line with exit status 143 (128 + SIGTERM). Multi-process
training leaves preemption to orbax's own policy (all processes must save the same step); a recovery
wave has no collectives, so each process saves its own rows.
"""

from __future__ import annotations

import contextlib
import signal
import threading

_REQUESTED = threading.Event()
EXIT_STATUS = 128 + signal.SIGTERM


class Preempted(Exception):
  """The run saved its state after a SIGTERM and stopped; rerunning the command resumes it."""


def requested() -> bool:
  return _REQUESTED.is_set()


@contextlib.contextmanager
def watch():
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = signal.getsignal(signal.SIGTERM)
  signal.signal(signal.SIGTERM, lambda signum, frame: _REQUESTED.set())
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)
    _REQUESTED.clear()
