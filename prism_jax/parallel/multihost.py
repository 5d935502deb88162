"""Multi-process JAX: initialisation (explicit coordinator flags, cluster auto-detection, or no-op)
and the few cross-process steps the stages need (barrier, broadcast, gathering a sharded batch)."""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from prism_jax import errors
from prism_jax.parallel import mesh as mesh_lib

# Environment variables that mean "this process is one worker of a managed cluster" for which
# jax.distributed.initialize() can detect everything by itself.
_CLUSTER_ENV_VARS = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_JOB_ID",
                     "OMPI_COMM_WORLD_SIZE")


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
               auto_detect: bool = False) -> bool:
  """Initializes multi-process JAX when asked or detected; returns True if it did.

  Explicit arguments (or PRISM_COORDINATOR_ADDRESS / PRISM_NUM_PROCESSES / PRISM_PROCESS_ID) are
  used for GPU VMs and local tests; `auto_detect` (--jax_distributed, passed by launch/tpu_vm.sh)
  lets JAX find a Cloud TPU slice from its metadata server; GKE TPU pods and SLURM are detected from
  their environment. A single host with none of these is a no-op.
  """
  coordinator_address = coordinator_address or os.environ.get("PRISM_COORDINATOR_ADDRESS", "")
  num_processes = num_processes or int(os.environ.get("PRISM_NUM_PROCESSES", "0"))
  if process_id < 0:
    process_id = int(os.environ.get("PRISM_PROCESS_ID", "-1"))
  if coordinator_address:
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise errors.ConfigError(f"--coordinator_address={coordinator_address} needs --num_processes >= 1 and "
                       f"0 <= --process_id < num_processes (got {num_processes}, {process_id})")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif auto_detect or (any(v in os.environ for v in _CLUSTER_ENV_VARS) and
                       os.environ.get("TPU_WORKER_HOSTNAMES", "x") not in ("", "localhost")):
    jax.distributed.initialize()
  else:
    return False
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def is_main_process() -> bool:
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (a no-op on one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def broadcast_from_main(value: int) -> int:
  """Process 0's value of an integer, on every process (so all take the same branch)."""
  if jax.process_count() == 1:
    return int(value)
  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def check_shared_directory(directory: str, stage: str) -> None:
  """Raises ValueError on every process unless every process sees process 0's files in `directory`.

  Recovery needs no shared work directory (process 0 gathers the images), but the later stages
  read what process 0 wrote (recovered images, soft labels) and write orbax checkpoints together.
  """
  if jax.process_count() == 1:
    return
  from prism_jax.io import artifacts  # a leaf module; imported here to keep parallel/ free of io/ at import
  token = broadcast_from_main(int.from_bytes(os.urandom(3), "little"))
  path = os.path.join(directory, ".shared_check.json")
  if is_main_process():
    artifacts.write_json(path, {"token": token})
  barrier(f"shared_check:{stage}")
  try:
    seen = artifacts.read_json(path).get("token") == token
  except artifacts.ArtifactError:
    seen = False
  sees = np.asarray(multihost_utils.process_allgather(np.int32(seen))).reshape(-1)
  blind = [i for i, ok in enumerate(sees) if not ok]
  if blind:
    raise errors.ConfigError(f"--workdir={directory}: process(es) {blind} do not see the files process 0 writes "
                     f"there; the {stage} stage of a multi-process run needs one work directory shared by "
                     "every process (a gs:// bucket or the same shared mount on every host)")


def gather_global_batch(local_rows, global_batch: int, mesh) -> dict:
  """Every process's rows of a data-sharded batch, in global row order, on every process.

  `local_rows` is a dict of host arrays holding this process's rows (`mesh.local_batch_slice`);
  the data travel through the devices (cross-process all-gather), so no shared filesystem is needed.
  """
  if jax.process_count() == 1:
    return {k: np.asarray(v) for k, v in local_rows.items()}
  arrays = {k: mesh_lib.put_global_batch(np.asarray(v), global_batch, mesh) for k, v in local_rows.items()}
  return {k: np.asarray(v) for k, v in multihost_utils.process_allgather(arrays, tiled=True).items()}
