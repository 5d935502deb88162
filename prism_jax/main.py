"""Command line entry point.

  python -m prism_jax.main --config configs/<experiment>.py --workdir <dir> [--config.x=y ...]

Parses flags, initializes multi-process JAX when asked (a no-op on one host), builds the mesh,
saves the resolved config in the work directory and runs the selected stage(s).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, artifacts and TensorBoard logs "
                                "(local, or a URL such as gs://bucket/run).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0 for multi-process "
                                   "runs on GPU VMs (TPU pods are detected automatically).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Number of processes (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index (with --coordinator_address).")
_JAX_DISTRIBUTED = flags.DEFINE_bool("jax_distributed", False, "Call jax.distributed.initialize() with "
                                     "cluster auto-detection (Cloud TPU VMs and pod slices).")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache_dir", None, "JAX's persistent compilation cache (local directory or URL); "
    "default $JAX_COMPILATION_CACHE_DIR, else ~/.cache/prism_jax/jax_cache; '' turns it off.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # Library INFO logs (orbax saves, backend probing) drown the progress lines; -v 0 brings them back.
    logging.set_verbosity(logging.WARNING)
  # TensorFlow is imported only where it alone can serve (TFDS data, gs:// paths), and then kept
  # off the accelerators (io/fs.py: import_tensorflow).
  import jax

  from prism_jax import config_checks, runtime, stages
  from prism_jax.io import compilation

  runtime.configure_jax()

  cache_dir = compilation.enable_persistent_cache(
      compilation.default_cache_dir() if _COMPILATION_CACHE.value is None else _COMPILATION_CACHE.value)
  compile_stats = compilation.CompileStats()
  from prism_jax.parallel import mesh as mesh_lib, multihost

  multihost.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                       auto_detect=_JAX_DISTRIBUTED.value)
  config = _CONFIG.value
  config_checks.validate(config)  # every selected stage's fields, before anything is written or read
  workdir = _open_workdir(_WORKDIR.value)
  mesh = mesh_lib.make_mesh(config.mesh.num_devices)
  if jax.process_index() == 0:  # only an accepted config replaces the last one (evaluate.compare_workdirs reads it)
    _write_config(workdir, config)
  if jax.process_index() == 0:
    print(f"[prism_jax] {jax.device_count()} {jax.default_backend()} device(s) in {jax.process_count()} "
          f"process(es); mesh {dict(mesh.shape)}; workdir {workdir}", flush=True)
  stages.run_stage(config.stage, config, workdir, mesh)
  if jax.process_index() == 0:
    print(f"[prism_jax] {compile_stats.summary(cache_enabled=cache_dir is not None)}" +
          (f" ({cache_dir})" if cache_dir else ""), flush=True)


WORKDIR_SCHEMES = ("gs", "ram")  # tf.io.gfile file systems the artifacts support (ram://: tests)


def _open_workdir(path: str) -> str:
  """The work directory as an absolute path or URL, created; ArtifactError/ConfigError naming it."""
  from prism_jax import errors
  from prism_jax.io import fs
  if fs.is_remote(path):
    scheme = path.split("://", 1)[0]
    if scheme not in WORKDIR_SCHEMES:
      raise errors.ConfigError(f"--workdir={path}: expected a local directory or a gs:// URL, not {scheme}://")
    fs.makedirs(path)
    return path
  workdir = fs.abspath(path)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise errors.ArtifactError(f"--workdir={path}: {workdir} is a file; expected a directory (or a path to create)")
  try:
    fs.makedirs(workdir)
  except OSError as e:
    raise errors.ArtifactError(f"--workdir={path}: cannot create {workdir} ({e.strerror})") from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise errors.ArtifactError(f"--workdir={path}: {workdir} is not writable")
  return workdir


def _write_config(workdir: str, config) -> None:
  from prism_jax.io import artifacts, layout
  artifacts.write_json(layout.config_file(workdir), config.to_dict())


def _run(argv):
  """Expected errors (errors.ConfigError, errors.ArtifactError, a non-finite loss) end with one
  `prism_jax: error: ...` line; anything else is a bug and keeps its traceback."""
  from prism_jax import errors
  from prism_jax.io import preemption
  try:
    main(argv)
  except preemption.Preempted as e:
    print(f"prism_jax: {e}", file=sys.stderr, flush=True)
    sys.exit(preemption.EXIT_STATUS)
  except errors.EXPECTED as e:
    if os.environ.get("PRISM_DEBUG"):
      raise
    print(f"prism_jax: error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


def _parse_flags(argv):
  """absl's flag parsing, with a refused flag or --config override ending in one error line (the
  config file's own error, an unknown field, a value of the wrong type) instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    message = str(e).split("\n\nTraceback")[0].strip()
    if "Traceback" in str(e):  # the config file raised: its last line says why
      message = message.split(": Error whilst parsing")[0] + ": " + str(e).strip().splitlines()[-1]
    print(f"prism_jax: error: {message}", file=sys.stderr, flush=True)
  except (AttributeError, KeyError, TypeError, ValueError) as e:  # raised by a --config.<field> override
    text = str(e).strip().strip("'\"").replace("\\n", "\n").replace("\\'", "'")
    field, _, hint = text.partition("\n")
    field = field.strip("'\"")
    named = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.") and
             field in a.split("=", 1)[0].split(".")[1:]]
    where = named[0] if named else "a --config override"
    print(f"prism_jax: error: {where}: no such config field {field!r}" + (f" ({hint.strip()})" if hint else ""),
          file=sys.stderr, flush=True)
  sys.exit(1)


if __name__ == "__main__":
  app.run(_run, flags_parser=_parse_flags)
