"""Reading stored soft labels (relabel stage output) for student training, checked against the plan.

`StoredLabels` refuses labels made for another image set, class order, batch size, number of epochs,
seed, teachers or views (naming the field), and verifies each epoch shard's checksum when it is read.
"""

from __future__ import annotations

import os

import numpy as np

from prism_jax.io import artifacts, layout
from prism_jax.relabel import plan, store, views


class StoredLabels:
  """Reads the relabel shards for the train stage, verifying them once per epoch."""

  def __init__(self, config, workdir, dataset, image_set):
    tr = config.train
    self.dir = layout.relabel_dir(workdir, image_set.name)
    index = store.read_index(self.dir)
    if index is None or not index.get("complete"):
      raise artifacts.ArtifactError(f"{self.dir}: no finished soft labels for the '{image_set.name}' set; run "
                                    "the relabel stage first (--config.stage=relabel)")
    found = index["fingerprint"]
    index_path = os.path.join(self.dir, store.INDEX_FILE)
    for field, expected in (("image_set", image_set.fingerprint()), ("class_names", list(dataset.class_names)),
                            ("batch_size", tr.batch_size), ("epochs", tr.epochs), ("seed", config.seed)):
      if artifacts.to_jsonable(found.get(field)) != artifacts.to_jsonable(expected):
        what = {"image_set": "image set", "class_names": "class order"}.get(field, field)
        raise artifacts.ArtifactError(
            f"{index_path}: the soft labels were made for a different {what} "
            f"({_short(found.get(field))}) than the train stage asks for ({_short(expected)}); rerun relabel "
            "with matching settings (delete that relabel directory first)")
    expected_views = plan.fingerprint(config, dataset, image_set, found["teachers"])
    artifacts.check_same("the soft labels", index_path, expected_views, found)
    self.index = index
    self._epoch, self._shard = -1, None
    self.num_classes = dataset.num_classes

  def epoch(self, epoch: int) -> dict:
    if epoch != self._epoch:
      shard = store.read_shard(self.dir, epoch, self.index)
      classes = shard["logits"].shape[-1]
      if classes != self.num_classes:
        raise artifacts.ArtifactError(f"{self.dir}/{store.shard_name(epoch)}: {classes} classes in the soft "
                                      f"labels, the student has {self.num_classes}")
      self._epoch, self._shard = epoch, shard
    return self._shard


def stored_batch(shard: dict, batch: int, images: np.ndarray, labels: np.ndarray):
  """(images uint8, ViewParams, hard labels, teacher logits) of stored batch `batch` of an epoch shard."""
  indices = shard["indices"][batch]
  params = views.ViewParams(*(np.asarray(shard[k][batch]) for k in views.ViewParams._fields))
  return images[indices], params, labels[indices], shard["logits"][batch]


def _short(value) -> str:
  if isinstance(value, dict) and "sha256" in value:
    return f"{value.get('name')} with {value.get('num_images')} images, sha256 {value['sha256'][:12]}..."
  text = str(value)
  return text if len(text) < 80 else text[:77] + "..."
