"""The random-real baseline as a method: IPC real training images per class, drawn without
replacement by a seeded generator (the RD3 / SRe2L baseline every method is measured against).

Settings: `ipc` (default `recover.ipc`) and `seed` (default the run's seed; -1 also means the run's
seed). One unit: the whole set (it is a draw and a copy). The manifest records each image's index in
the training split.
"""

from __future__ import annotations

import time

import ml_collections
import numpy as np

from prism_jax import errors
from prism_jax.data import image_sets
from prism_jax.methods import base

NAME = "random_real"


class RandomRealMethod(base.Method):
  name = NAME
  description = "IPC random real training images per class (the baseline)"

  def default_settings(self, config):
    c = ml_collections.ConfigDict()
    c.ipc = int(config.recover.ipc)   # images per class
    c.seed = -1                        # -1 = the run's seed
    return c

  def validate(self, settings, config, field):
    if settings.ipc < 1:
      raise errors.ConfigError(f"{field}.ipc={settings.ipc!r}: expected an integer >= 1")
    if settings.seed < -1:
      raise errors.ConfigError(f"{field}.seed={settings.seed!r}: expected -1 (the run's seed) or >= 0")

  def _seed(self, ctx) -> int:
    return ctx.config.seed if ctx.settings.seed == -1 else int(ctx.settings.seed)

  def fingerprint(self, ctx):
    return {"random_real": {"ipc": int(ctx.settings.ipc), "seed": self._seed(ctx)}, "data": ctx.dataset.fingerprint()}

  def plan(self, ctx):
    return image_sets.random_real_indices(ctx.dataset, int(ctx.settings.ipc), self._seed(ctx))

  def run(self, ctx, chosen):
    start = time.perf_counter()
    dataset = ctx.dataset
    labels = dataset.labels("train")[chosen].astype(np.int32)
    images = dataset.read("train", chosen)
    ipc = np.concatenate([np.arange(np.count_nonzero(labels == c)) for c in range(dataset.num_classes)])
    manifest = [{"class": int(c), "class_name": dataset.class_names[int(c)], "ipc_index": int(i),
                 "train_index": int(t), "method": NAME, "seed": self._seed(ctx)}
                for c, i, t in zip(labels, ipc, chosen)]
    base.write_set(ctx, images, labels, ipc, manifest)
    return {"num_images": int(len(chosen)), "class_names": list(dataset.class_names),
            "wall_seconds_last_run": time.perf_counter() - start}
