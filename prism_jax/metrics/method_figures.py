"""Figures of the selection and generation methods for the report (issue: DPS's selected crops per
cluster, DAP's samples with and without guidance), drawn with `pictures.image_grid`'s layout."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from prism_jax.metrics import pictures

MAX_CLUSTERS = 4   # columns of the DPS figure: its best-ranked clusters


def dps_cells(images: np.ndarray, labels: np.ndarray, ipc_index: np.ndarray, manifest: Sequence[dict]):
  """The stitched cells of a DPS set with their class, cluster rank and member rank (from the manifest)."""
  by_key = {(int(r["class"]), int(r["ipc_index"])): r for r in manifest}
  cells = []
  for image, c, i in zip(images, labels, ipc_index):
    record = by_key[(int(c), int(i))]
    factor = int(record["factor"])
    side = image.shape[0] // factor
    for k, cell in enumerate(record["cells"]):
      r, q = divmod(k, factor)
      cells.append((image[r * side:(r + 1) * side, q * side:(q + 1) * side], int(c), int(cell["cluster_rank"]),
                    int(cell["member_rank"])))
  return cells


def dps_cluster_figure(images, labels, ipc_index, manifest, class_names, path: str, *, per_cluster: int = 3,
                       max_classes: int = 10) -> str:
  """A row per class, a block per cluster (best-ranked first): the crops DPS picked from it, nearest
  to the centroid first."""
  cells = dps_cells(images, labels, ipc_index, manifest)
  size = cells[0][0].shape[:2]
  blocks = {}
  for rank in sorted({c[2] for c in cells})[:MAX_CLUSTERS]:
    chosen = sorted((c for c in cells if c[2] == rank and c[0].shape[:2] == size), key=lambda c: (c[1], c[3]))
    if chosen:
      blocks[f"cluster {rank + 1}"] = (np.stack([c[0] for c in chosen]), np.array([c[1] for c in chosen]))
  return pictures.image_grid(blocks, class_names, path, per_class=per_cluster, max_classes=max_classes)


def dap_guidance_figure(dit_images, dit_labels, dap_images, dap_labels, class_names, path: str, *,
                        per_class: int = 4, max_classes: int = 10) -> str:
  """dit and DAP samples side by side: the same x_T per (class, IPC index), without and with guidance."""
  return pictures.image_grid({"dit (no guidance)": (dit_images, dit_labels), "dap (guided)": (dap_images, dap_labels)},
                             class_names, path, per_class=per_class, max_classes=max_classes)


def same_start(dit_manifest: Sequence[dict], dap_manifest: Sequence[dict]) -> bool:
  """Whether the dit and DAP sets share their starting noise and sampler (so their images pair up)."""
  keys = ("seed", "num_steps", "cfg_scale", "eta")
  pairs = {(r["class"], r["ipc_index"]): tuple(r[k] for k in keys) for r in dit_manifest}
  return bool(dap_manifest) and all(pairs.get((r["class"], r["ipc_index"])) == tuple(r[k] for k in keys)
                                    for r in dap_manifest)
