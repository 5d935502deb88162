"""Diffusion-family checkpoints (a DiT or an AutoencoderKL): variables plus the spec that rebuilds them.

Layout of a model directory (imported by `prism_jax.tools.import_dit` / `import_vae`, or trained by
the `diffusion` stage):
  variables.msgpack   flax-serialized variables (float32)
  model.json          kind ('dit' or 'vae'), the model spec (the keyword arguments of its
                      constructor), class names (DiT), where it came from, and the checksum of
                      the variables file; written last, so its presence marks a finished model.
Loading verifies the checksum and the spec before anything is built, so a truncated or corrupt
file is never used.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import flax.serialization
import jax
import numpy as np

from prism_jax.io import artifacts, fs

VARIABLES_FILE = "variables.msgpack"
META_FILE = "model.json"
KINDS = ("dit", "vae")


def is_complete(model_dir: str) -> bool:
  return fs.exists(os.path.join(model_dir, META_FILE))


def save_model(model_dir: str, *, kind: str, variables: Mapping[str, Any], spec: Mapping[str, Any],
               class_names: Sequence[str] | None = None, source: Any = None,
               extra: Mapping[str, Any] | None = None) -> None:
  """Writes a model directory atomically (variables first, metadata last)."""
  if kind not in KINDS:
    raise ValueError(f"kind={kind!r}: expected one of {KINDS}")
  host_vars = jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x), np.float32),
                                     dict(variables))
  data = flax.serialization.msgpack_serialize(host_vars)
  artifacts.write_bytes(os.path.join(model_dir, VARIABLES_FILE), data)
  meta = dict(kind=kind, spec=dict(spec),
              class_names=None if class_names is None else list(class_names),
              source=source, variables_sha256=artifacts.sha256_bytes(data), **dict(extra or {}))
  artifacts.write_json(os.path.join(model_dir, META_FILE), artifacts.to_jsonable(meta))


def load_meta(model_dir: str, *, kind: str | None = None) -> dict[str, Any]:
  path = os.path.join(model_dir, META_FILE)
  if not fs.exists(path):
    raise artifacts.ArtifactError(
        f"{path}: no finished diffusion model here (import one with `python -m "
        "prism_jax.tools.import_dit` / `import_vae`, or train one with the `diffusion` stage)")
  meta = artifacts.read_json(path)
  if not isinstance(meta, dict) or meta.get("kind") not in KINDS or not isinstance(meta.get("spec"), dict):
    raise artifacts.ArtifactError(f"{path}: not a diffusion model description (kind/spec missing)")
  if kind is not None and meta["kind"] != kind:
    raise artifacts.ArtifactError(f"{path}: holds a '{meta['kind']}' model, expected a '{kind}' model")
  return meta


def load_variables(model_dir: str, *, kind: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
  """Returns (variables as numpy arrays, meta) after checking the file's checksum."""
  meta = load_meta(model_dir, kind=kind)
  data = artifacts.read_verified_bytes(os.path.join(model_dir, VARIABLES_FILE), meta.get("variables_sha256"))
  return flax.serialization.msgpack_restore(data), meta
