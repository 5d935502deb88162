"""Stored soft labels: one checksummed shard per epoch plus an index (SPEC 5).

Layout of `<set dir>/relabel/`:
  epoch_NNNNN.npz   for every batch b of epoch N: indices (nb, B) into the image set, crop (nb, B, 4),
                    flip (nb, B), patch_perm (nb, B, g*g), cutmix_box (nb, 4), cutmix_perm (nb, B),
                    cutmix_lam (nb,), logits float16 (nb, B, C)
  labels.json       fingerprint (image set hash, class order, teachers, aggregation, views, seed,
                    batch size, epochs) and the sha256 of every finished shard; `complete` when all
                    epochs are there. Shards are written atomically and recorded after they are
                    written, so a shard that is on disk but not in the index is simply redone.
"""

from __future__ import annotations

import os

import numpy as np

from prism_jax.io import artifacts, fs

INDEX_FILE = "labels.json"
SHARD_KEYS = ("indices", "crop", "flip", "patch_perm", "cutmix_box", "cutmix_perm", "cutmix_lam", "logits")


def shard_name(epoch: int) -> str:
  return f"epoch_{epoch:05d}.npz"


def read_index(directory: str) -> dict | None:
  path = os.path.join(directory, INDEX_FILE)
  return artifacts.read_json(path) if fs.exists(path) else None


def write_index(directory: str, index: dict) -> None:
  artifacts.write_json(os.path.join(directory, INDEX_FILE), index)


def write_shard(directory: str, epoch: int, arrays: dict) -> str:
  """Writes one epoch's shard atomically; returns its sha256."""
  missing = [k for k in SHARD_KEYS if k not in arrays]
  if missing:
    raise ValueError(f"shard of epoch {epoch}: missing {missing}")
  path = os.path.join(directory, shard_name(epoch))
  artifacts.write_npz(path, **{k: np.asarray(arrays[k]) for k in SHARD_KEYS})
  return artifacts.sha256_file(path)


def read_shard(directory: str, epoch: int, index: dict) -> dict:
  """Loads and verifies the shard of `epoch` against the checksum in the index."""
  name = shard_name(epoch)
  path = os.path.join(directory, name)
  expected = index.get("shards", {}).get(name)
  if expected is None or not fs.exists(path):
    raise artifacts.ArtifactError(
        f"{path}: missing soft-label shard for epoch {epoch}; rerun the relabel stage "
        "(--config.stage=relabel) to finish it")
  found = artifacts.sha256_file(path)
  if found != expected:
    raise artifacts.ArtifactError(f"{path}: checksum {found[:12]}... does not match the index "
                                  f"({expected[:12]}...); the shard is corrupt: rerun the relabel stage "
                                  "(--config.stage=relabel), which redoes it")
  with fs.open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
    return {k: z[k] for k in SHARD_KEYS}


def damaged_shards(directory: str, index: dict) -> list[str]:
  """Names of the index's shards that are missing or fail their recorded checksum."""
  bad = []
  for name, expected in sorted(index.get("shards", {}).items()):
    path = os.path.join(directory, name)
    if not fs.exists(path) or artifacts.sha256_file(path) != expected:
      bad.append(name)
  return bad


def bytes_per_epoch(batches: int, batch_size: int, num_classes: int, patch_cells: int) -> int:
  per_row = num_classes * 2 + 4 + 4 * 4 + 1 + 4 * patch_cells + 4
  return batches * (batch_size * per_row + 4 * 4 + 4)
