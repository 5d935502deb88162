"""What the selection and generation methods share: random streams per unit, batches mapped over the
mesh, and finished units kept on disk so a killed run resumes where it stopped.

Randomness: every draw of a method is a function of (seed, purpose, class, index, ...) only —
`unit_keys` for JAX draws, `unit_rng` for host draws — never of the batch a unit runs in or of the
device count, so 1 and 8 devices (and a resumed run) make the same set.

`map_rows(fn, variables, rows, mesh)` runs `fn(variables, batch)` over the rows of a dict of host
arrays in global batches sharded over the mesh (the last batch padded by repeating the last row) and
returns every row on every process; per-row results do not depend on the batch.

`Units` keeps each finished unit (a dict of arrays) in `<set>/units/<name>.npz`, written atomically by
process 0; process 0 decides whether a unit is done and every process follows it, so the collectives
of a unit's computation are entered by all processes or by none. A SIGTERM between units stops the
run (`preemption.Preempted`) with every finished unit kept.
"""

from __future__ import annotations

import io
import os
import zipfile
import zlib
from typing import Any, Callable, Mapping

import jax
import numpy as np

from prism_jax.io import artifacts, fs, preemption
from prism_jax.parallel import mesh as mesh_lib, multihost

PER_DEVICE_BATCH = 32  # rows per device of one `map_rows` batch


def purpose_id(purpose: str) -> int:
  return zlib.crc32(purpose.encode()) & 0x7FFFFFFF


def unit_keys(seed: int, purpose: str, index_rows: np.ndarray) -> jax.Array:
  """The JAX key of each row of an (N, k) integer array: fold_in(PRNGKey(seed), purpose, *row) (N keys,
  computed in one program)."""
  index_rows = np.asarray(index_rows, np.int32).reshape(len(index_rows), -1)
  base = jax.random.fold_in(jax.random.PRNGKey(int(seed)), purpose_id(purpose))

  def one(row):
    key = base
    for j in range(index_rows.shape[1]):
      key = jax.random.fold_in(key, row[j])
    return key
  return np.asarray(jax.jit(jax.vmap(one))(index_rows))


def unit_rng(seed: int, purpose: str, *indices: int) -> np.random.Generator:
  """The host generator of one unit's draw (numpy, seeded by (seed, purpose, *indices))."""
  return np.random.default_rng([int(seed), purpose_id(purpose), *[int(i) for i in indices]])


def map_rows(fn: Callable, variables: Any, rows: Mapping[str, np.ndarray], mesh, *,
             per_device: int = PER_DEVICE_BATCH, jitted: Callable | None = None) -> dict[str, np.ndarray]:
  """`fn(variables, batch) -> dict of (B, ...) arrays` over every row of `rows` (host arrays of equal
  length, the same on every process); returns the concatenated results on every process. `jitted`
  reuses a program built by `compile_rows` (one program for repeated calls)."""
  count = len(next(iter(rows.values())))
  if any(len(v) != count for v in rows.values()):
    raise ValueError(f"map_rows: rows of unequal lengths {[len(v) for v in rows.values()]}")
  if count == 0:
    raise ValueError("map_rows: no rows")
  num_devices = mesh.devices.size
  batch = min(per_device, -(-count // num_devices)) * num_devices
  local = mesh_lib.local_batch_slice(batch, mesh)
  program = jitted or compile_rows(fn, mesh)
  variables = mesh_lib.replicate(variables, mesh) if jitted is None else variables
  outs: dict[str, list] = {}
  for start in range(0, count, batch):
    index = np.minimum(np.arange(start, start + batch), count - 1)[local]
    placed = {k: mesh_lib.put_global_batch(np.asarray(v)[index], batch, mesh) for k, v in rows.items()}
    out = program(variables, placed)
    for k, v in out.items():
      outs.setdefault(k, []).append(np.asarray(v.addressable_shards[0].data)[:min(batch, count - start)])
  return {k: np.concatenate(v) for k, v in outs.items()}


def compile_rows(fn: Callable, mesh) -> Callable:
  """The jitted program `map_rows` runs: batch rows sharded over the data axis, results replicated."""
  return jax.jit(fn, in_shardings=(mesh_lib.replicated(mesh), mesh_lib.data_sharding(mesh)),
                 out_shardings=mesh_lib.replicated(mesh))


def to_host(tree):
  """A replicated (or host) pytree as numpy arrays."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(x.addressable_shards[0].data)
    return np.asarray(x)
  return jax.tree_util.tree_map(get, tree)


class Units:
  """Finished units of one set: `<out_dir>/units/<name>.npz`, each with the unit's identity."""

  def __init__(self, unit_dir: str, tag: str):
    self.dir, self.tag = unit_dir, tag
    self.reused = 0

  def path(self, name: str) -> str:
    return os.path.join(self.dir, f"{name}.npz")

  def _load(self, name: str, identity: str) -> dict[str, np.ndarray] | None:
    path = self.path(name)
    if not fs.exists(path):
      return None
    try:
      with fs.open(path, "rb") as f:
        data = f.read()
      with np.load(io.BytesIO(data), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as err:
      print(f"[{self.tag}] {path}: unreadable ({err}); making the unit again", flush=True)
      return None
    if str(arrays.pop("__unit__", "")) != identity:
      print(f"[{self.tag}] {path}: belongs to another unit; making it again", flush=True)
      return None
    return arrays

  def get_or_make(self, name: str, identity: str, make: Callable[[], Mapping[str, np.ndarray]]) -> dict | None:
    """The unit's arrays: the kept ones when process 0 has them, else `make()` (on every process),
    then kept. Returns None on the other processes when the unit was kept (only process 0 writes the
    set). Raises `preemption.Preempted` when a SIGTERM arrived before the unit started."""
    # Process 0's SIGTERM decides for every process (one that stopped alone would leave the others
    # waiting in the next collective).
    if multihost.broadcast_from_main(int(preemption.requested())):
      raise preemption.Preempted(f"[{self.tag}] stopped by SIGTERM; every finished unit is kept in {self.dir}; "
                                 "rerun the command to resume")
    kept = self._load(name, identity) if multihost.is_main_process() else None
    if multihost.broadcast_from_main(int(kept is not None)):
      self.reused += 1
      return kept
    arrays = {k: np.asarray(v) for k, v in make().items()}
    if multihost.is_main_process():
      fs.makedirs(self.dir)
      artifacts.write_npz(self.path(name), __unit__=np.array(identity), **arrays)
    return arrays
