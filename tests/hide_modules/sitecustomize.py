"""Hides the top-level packages named in PRISM_HIDE_MODULES (comma-separated) from this process.

Put this directory first on PYTHONPATH and Python loads this file at start-up. A `None` entry in
sys.modules is Python's own way to mark a module as absent: `import tensorflow` then raises
ModuleNotFoundError and `importlib.util.find_spec('tensorflow')` returns None, as on a machine
without it (the GPU machines of benchmarks/device_check.sh have no TensorFlow). Used by
tests/cli_utils.py.
"""

import os
import sys

for _name in os.environ.get("PRISM_HIDE_MODULES", "").split(","):
  if _name.strip():
    sys.modules[_name.strip()] = None
