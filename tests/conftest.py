"""Test set-up: 8 simulated CPU devices (must be set before JAX is imported anywhere)."""

import os
import shutil
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

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


# The test files that take longest (seconds of one worker, measured on the 2-core development machine:
# selection_generation 108, configs 88, squeeze 86, torchvision_parity 85, diffusion_stage 80, ...),
# longest first. `-n 2 --dist loadfile` hands files to the workers in the order of its work queue as
# they run dry, so queueing the long ones first packs the two workers evenly
# (longest-processing-time-first); the rest follow in their usual order. xdist would otherwise queue
# files by their number of tests (`pytest_configure` turns that off).
LONGEST_FIRST = (
    "test_selection_generation.py",
    "test_configs.py",
    "test_squeeze.py",
    "test_torchvision_parity.py",
    "test_diffusion_stage.py",
    "test_relabel_train.py",
    "test_recover.py",
    "test_device_check.py",
    "test_models.py",
    "test_precision.py",
    "test_multihost_train.py",
    "test_diffusion_process.py",
    "test_compilation.py",
    "test_multihost.py",
    "test_quickstart.py",
    "test_augment.py",
    "test_depthwise.py",
    "test_dit.py",
    "test_remote_workdir.py",
    "test_vae.py",
    "test_methods.py",
    "test_metrics.py",
    "test_recover_objective.py",
    "test_bn_stats.py",
    "test_parallel.py",
    "test_data_sources.py",
    "test_student_objectives.py",
)


def pytest_configure(config):
  if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the collection order above
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(session, config, items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  order = {id(item): n for n, item in enumerate(items)}
  items.sort(key=lambda item: (rank.get(os.path.basename(str(item.fspath)), len(rank)), order[id(item)]))


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def fast_xla():
  """For a module whose in-process runs are compared only with each other: most XLA optimizations
  off, as the CLI test runs have them (compilation dominates these toy programs)."""
  import jax
  before = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", before)
