"""Host-to-device input: global batches sharded over the mesh's data axis.

Batches are a pure function of (seed, step): the sample order of epoch e is a seeded permutation,
batch b of that epoch is rows [b*B, (b+1)*B) of it, and each process reads only the rows its own
devices hold. Resuming at step s therefore needs no iterator state, and the batches are the same
for any number of devices or processes. The remainder of an epoch is dropped (static shapes).
"""

from __future__ import annotations

import concurrent.futures
from typing import Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from prism_jax.data import sources
from prism_jax.parallel import mesh as mesh_lib


class TrainBatches:
  """Deterministic, resumable global batches of a dataset split, prefetched on a thread."""

  def __init__(self, dataset, split: str, global_batch: int, seed: int, mesh: Mesh, prefetch: int = 2):
    self.dataset, self.split, self.global_batch, self.seed, self.mesh = dataset, split, global_batch, seed, mesh
    self.num_examples = dataset.num_examples(split)
    self.steps_per_epoch = self.num_examples // global_batch
    if self.steps_per_epoch < 1:
      raise ValueError(f"batch_size={global_batch} is larger than the {self.num_examples} "
                       f"examples of the '{split}' split of {dataset.name}")
    self.local_rows = mesh_lib.local_batch_slice(global_batch, mesh)
    self._labels = dataset.labels(split)
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    self._pending: dict[int, concurrent.futures.Future] = {}
    self.prefetch = prefetch

  def indices(self, step: int) -> np.ndarray:
    """Global example indices of the batch at `step`."""
    epoch, position = divmod(step, self.steps_per_epoch)
    order = sources.epoch_permutation(self.num_examples, self.seed, epoch)
    return order[position * self.global_batch:(position + 1) * self.global_batch]

  def _read_local(self, step: int):
    idx = self.indices(step)[self.local_rows]
    return self.dataset.read(self.split, idx), self._labels[idx].astype(np.int32)

  def get(self, step: int) -> tuple[jax.Array, jax.Array]:
    future = self._pending.pop(step, None)
    images, labels = future.result() if future else self._read_local(step)
    for ahead in range(step + 1, step + 1 + self.prefetch):
      if ahead not in self._pending:
        self._pending[ahead] = self._pool.submit(self._read_local, ahead)
    for stale in [s for s in self._pending if s < step]:
      self._pending.pop(stale).cancel()
    return (mesh_lib.put_global_batch(images, self.global_batch, self.mesh),
            mesh_lib.put_global_batch(labels, self.global_batch, self.mesh))

  def close(self) -> None:
    for f in self._pending.values():
      f.cancel()
    self._pool.shutdown(wait=True)


def eval_batches(dataset, split: str, global_batch: int, mesh: Mesh) -> Iterator[tuple[jax.Array, ...]]:
  """The whole split in order, the last batch padded; yields (images, labels, mask)."""
  n = dataset.num_examples(split)
  labels = dataset.labels(split)
  rows = mesh_lib.local_batch_slice(global_batch, mesh)
  for start in range(0, n, global_batch):
    idx = np.arange(start, start + global_batch)
    mask = idx < n
    idx = np.where(mask, idx, n - 1)[rows]
    images = dataset.read(split, idx)
    yield (mesh_lib.put_global_batch(images, global_batch, mesh),
           mesh_lib.put_global_batch(labels[idx].astype(np.int32), global_batch, mesh),
           mesh_lib.put_global_batch(mask[rows], global_batch, mesh))


def evaluate_split(eval_step, state, dataset, split: str, global_batch: int, mesh: Mesh) -> dict:
  """Top-1 (top-5 above 10 classes) and mean loss of `eval_step` over a whole split."""
  totals = None
  for batch in eval_batches(dataset, split, global_batch, mesh):
    out = eval_step(state, *batch)
    totals = out if totals is None else jax.tree_util.tree_map(lambda a, b: a + b, totals, out)
  totals = jax.device_get(totals)
  result = {"top1": totals["correct"] / totals["count"], "loss": totals["loss_sum"] / totals["count"]}
  if dataset.num_classes > 10:
    result["top5"] = totals["correct_top5"] / totals["count"]
  return result
