"""Device mesh and shardings. One data axis: batches (and stacked recovery batches) split over it."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from prism_jax import errors

DATA_AXIS = "data"


def make_mesh(num_devices: int = -1) -> Mesh:
  """A 1-D mesh over `num_devices` devices (-1: all devices of all processes)."""
  devices = jax.devices()
  if num_devices == -1:
    num_devices = len(devices)
  if not 1 <= num_devices <= len(devices):
    raise errors.ConfigError(f"mesh.num_devices={num_devices}: expected -1 or 1..{len(devices)}")
  if num_devices != len(devices) and jax.process_count() > 1:
    raise errors.ConfigError("mesh.num_devices must be -1 when running on several processes")
  return Mesh(np.asarray(devices[:num_devices]), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis split over the data axis, the rest replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def local_batch_slice(global_batch: int, mesh: Mesh) -> slice:
  """Rows of a global batch that this process feeds (its devices' contiguous block)."""
  num_devices = mesh.devices.size
  if global_batch % num_devices:
    raise ValueError(f"global batch size {global_batch} is not divisible by the {num_devices} "
                     "devices of the mesh")
  per_device = global_batch // num_devices
  local = [i for i, d in enumerate(mesh.devices.flat) if d.process_index == jax.process_index()]
  start, stop = min(local) * per_device, (max(local) + 1) * per_device
  if stop - start != len(local) * per_device:
    raise ValueError("this process's devices are not contiguous on the mesh's data axis")
  return slice(start, stop)


def put_global_batch(local_rows: np.ndarray, global_batch: int, mesh: Mesh) -> jax.Array:
  """Builds a globally sharded array from this process's rows (no cross-host copy)."""
  shape = (global_batch,) + tuple(local_rows.shape[1:])
  return jax.make_array_from_process_local_data(data_sharding(mesh), local_rows, shape)


def fetch_local_batch(array: jax.Array) -> np.ndarray:
  """This process's rows of a data-sharded array, as a host array (`jax.device_get` would need
  every process's rows, which a multi-process run cannot fetch)."""
  shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards])


def replicate(tree, mesh: Mesh):
  """Places a host pytree (the same on every process) on every device of the mesh.

  With several processes each fills only its own devices: `jax.device_put` would first all-gather
  every leaf to check that the processes agree, a collective as large as the tree (the whole image
  set in relabel) that also stalls a process until all others reach the same call.
  """
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def put(leaf):
    host = np.asarray(leaf)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
  return jax.tree_util.tree_map(put, tree)
