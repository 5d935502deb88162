"""jax.distributed initialisation: explicit coordinator flags, cluster auto-detection, or no-op."""

from __future__ import annotations

import os

import jax
from absl import logging

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
      raise ValueError(f"--coordinator_address={coordinator_address} needs --num_processes >= 1 and "
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
