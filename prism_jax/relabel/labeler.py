"""Teacher-ensemble soft labels on a batch of views, shared by stored relabeling and online mode."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from prism_jax.parallel import mesh as mesh_lib
from prism_jax.relabel import aggregate, views


def ensemble_logits(models: Sequence, teacher_variables: Sequence, x: jax.Array, aggregation: str) -> jax.Array:
  """(B, C) float32 aggregated eval-mode logits of `models` on normalized images x."""
  logits = jnp.stack([m.apply(v, x, train=False).astype(jnp.float32)
                      for m, v in zip(models, teacher_variables)])
  return aggregate.aggregate_logits(logits, aggregation)


def label_batch(teacher_variables, images_u8, params: views.ViewParams, *, models, spec: views.ViewSpec,
                mean, std, aggregation: str, mesh=None):
  """Views of one batch and the teachers' aggregated logits on them, as float16.

  The views are built on the whole batch (CutMix mixes rows); the teacher forward is then split over
  the mesh's data axis, the batch padded to a multiple of the device count (eval-mode teachers treat
  rows independently, so padding rows change nothing and are dropped).
  """
  x = views.normalized_views(images_u8, params, spec, mean, std)
  batch = x.shape[0]
  if mesh is not None and mesh.devices.size > 1:
    padded = -(-batch // mesh.devices.size) * mesh.devices.size
    x = jnp.pad(x, ((0, padded - batch), (0, 0), (0, 0), (0, 0)))
    x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(mesh_lib.DATA_AXIS)))
  logits = ensemble_logits(models, teacher_variables, x, aggregation)[:batch]
  return logits.astype(jnp.float16)
