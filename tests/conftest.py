"""Test set-up: 8 simulated CPU devices (must be set before JAX is imported anywhere)."""

import os
import sys

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
