"""Orbax checkpoint manager for training loops: interval + preemption saves, keep-latest-N, resume.

Orbax writes each step into a temporary directory and renames it when complete, so a kill at any
moment leaves either the previous checkpoint or the new one, never a half-written one. Nothing in
orbax checks a finished checkpoint's bytes, so after each save the size and sha256 of its every file
go to `<directory>/checksums/<step>.json`; a restore verifies them first and skips (and deletes) a
checkpoint that fails, in favour of the newest intact one, saying so. A checkpoint without a record
is trusted only in a directory that has no records at all (one written before records existed).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from prism_jax import errors
from prism_jax.io import artifacts, fs

CHECKSUMS_DIR = "checksums"

# URL schemes orbax can use: those etils.epath knows (etils/epath/gpath.py, _URI_SCHEMES).
# Other tf.io.gfile schemes (ram://) hold artifacts but not checkpoints.
ORBAX_SCHEMES = ("gs", "s3", "az", "hf")


def create_manager(directory: str, *, save_every_steps: int, keep: int) -> ocp.CheckpointManager:
  scheme = directory.split("://", 1)[0] if fs.is_remote(directory) else None
  if scheme is not None and scheme not in ORBAX_SCHEMES:
    raise errors.ConfigError(f"{directory}: orbax checkpoints need a local or gs:// directory, not {scheme}://; "
                             "the squeeze, diffusion and train stages checkpoint, so give them such a --workdir")
  policies = ocp.checkpoint_managers
  options = ocp.CheckpointManagerOptions(
      save_decision_policy=policies.AnySavePolicy([
          policies.FixedIntervalPolicy(max(1, save_every_steps)),
          policies.PreemptionCheckpointingPolicy(),
      ]),
      preservation_policy=policies.LatestN(max(1, keep)),
      create=True,
      # Synchronous saves: on a 2-core host async saves only compete with training, and a
      # finished save() call means the step is durable.
      enable_async_checkpointing=False,
  )
  return ocp.CheckpointManager(fs.abspath(directory), options=options)


def _step_dir(manager: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(manager.directory), str(step))


def _record_path(manager: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(manager.directory), CHECKSUMS_DIR, f"{step}.json")


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict, force: bool = False) -> bool:
  saved = manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)), force=force)
  if saved:
    manager.wait_until_finished()
    if jax.process_index() == 0:  # the saves are synchronous: the step's files are final now
      from prism_jax.io import completion
      directory = _step_dir(manager, step)
      record = completion.record_files(directory, fs.walk_files(directory))
      artifacts.write_json(_record_path(manager, step), {"step": step, "files": record})
      kept = {str(s) for s in manager.all_steps()}
      for name in fs.listdir(os.path.dirname(_record_path(manager, step))):
        if name.endswith(".json") and name[:-len(".json")] not in kept:
          fs.remove(os.path.join(os.path.dirname(_record_path(manager, step)), name))
  return saved


def damage(manager: ocp.CheckpointManager, step: int) -> str | None:
  """Why checkpoint `step` cannot be trusted, or None when its files match their record."""
  path = _record_path(manager, step)
  if not fs.exists(path):
    return "it has no checksum record (interrupted while recording it)"
  from prism_jax.io import completion
  directory = _step_dir(manager, step)
  files = artifacts.read_json(path)["files"]
  extra = sorted(set(fs.walk_files(directory)) - set(files))
  return completion.damaged_file(directory, files) or (f"{directory}/{extra[0]} is not in its record"
                                                      if extra else None)


def restore_latest(manager: ocp.CheckpointManager, state_template: Any):
  """Returns (step, state, meta) of the newest intact checkpoint, or (0, state_template, {}) if none.

  The template's shardings are used for the restored arrays. A checkpoint that fails its checksum
  record is reported and deleted, and the previous one is tried.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  records = fs.exists(os.path.join(str(manager.directory), CHECKSUMS_DIR))
  step = None
  for candidate in steps:
    why = damage(manager, candidate) if records else None
    if why is None:
      step = candidate
      break
    if jax.process_index() == 0:
      print(f"[checkpoint] {_step_dir(manager, candidate)}: {why}; not resuming from it "
            f"({'trying the previous one' if candidate != steps[-1] else 'no earlier checkpoint: starting over'})",
            flush=True)
    manager.delete(candidate)  # every process sees the same files and takes the same decision
  manager.reload()
  if step is None:
    return 0, state_template, {}
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state_template)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                           meta=ocp.args.JsonRestore()))
  return step, restored["state"], dict(restored["meta"] or {})
