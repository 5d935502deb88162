"""Test set-up: 8 simulated CPU devices (must be set before JAX is imported anywhere)."""

import os
import shutil
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Most XLA optimizations off for the whole session, in-process and in the CLI subprocesses (which
# inherit it): compilation dominates these toy programs (about a fifth of the suite's CPU time goes
# with it), and runs compared with each other then come from the same kind of programs. A module
# whose numbers are checked against a reference as users run it opts back in (`optimized_xla`).
os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

# torch (parity tests only) must be imported before TensorFlow (pulled in by clu's writers and
# the TFDS source): importing torchvision after TensorFlow segfaults in this stack.
try:
  import torch  # noqa: F401
  import torchvision  # noqa: F401
except ImportError:
  pass

# The command line's process-wide JAX settings (prism_jax/runtime.py), so that library calls made
# by the tests draw the same random numbers as a CLI run.
from prism_jax import runtime  # noqa: E402

runtime.configure_jax()

# One XLA compilation cache for the CLI subprocesses of this test session (tests/cli_utils.py): a
# resumed, repeated or cooperating run compiles the same programs as the run before it. Made by the
# first process that loads this file (the pytest-xdist controller; its workers inherit it) and
# removed by it at the end.
_XLA_CACHE_VAR = "PRISM_TEST_XLA_CACHE"
_OWN_XLA_CACHE = _XLA_CACHE_VAR not in os.environ
if _OWN_XLA_CACHE:
  os.environ[_XLA_CACHE_VAR] = tempfile.mkdtemp(prefix="prism_jax_test_xla_cache_")


def pytest_unconfigure(config):
  if _OWN_XLA_CACHE:
    shutil.rmtree(os.environ.pop(_XLA_CACHE_VAR), ignore_errors=True)


import pytest  # noqa: E402


@pytest.fixture
def optimized_xla():
  """For a test whose numbers are compared with a reference implementation: XLA's optimizations on,
  as a user's run has them (the session turns most of them off)."""
  import jax
  before = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", False)
  yield
  jax.config.update("jax_disable_most_optimizations", before)
