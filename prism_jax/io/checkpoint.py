"""Orbax checkpoint manager for training loops: interval + preemption saves, keep-latest-N, resume.

Orbax writes each step into a temporary directory and renames it when complete, so a kill at any
moment leaves either the previous checkpoint or the new one, never a half-written one.
"""

from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp

from prism_jax import errors
from prism_jax.io import fs

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


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict, force: bool = False) -> bool:
  return manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=force)


def restore_latest(manager: ocp.CheckpointManager, state_template: Any):
  """Returns (step, state, meta) of the newest checkpoint, or (0, state_template, {}) if none.

  The template's shardings are used for the restored arrays.
  """
  step = manager.latest_step()
  if step is None:
    return 0, state_template, {}
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state_template)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                           meta=ocp.args.JsonRestore()))
  return step, restored["state"], dict(restored["meta"] or {})
