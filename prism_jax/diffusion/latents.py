"""Latent space of the diffusion stage: the VAE directory, the cached latents of the training split, decoding.

With `config.diffusion.space='latent'` the DiT is trained on VAE latents instead of pixels:
  - `vae_info(vae_dir)` reads the VAE's model.json (a diffusion_store 'vae' directory, e.g. written by
    `python -m prism_jax.tools.import_vae`) without loading its weights: checksum, spec, downsampling
    factor, latent channels; `latent_shape` checks the data's image size against the factor.
  - `encode_split` encodes a split once, in batches sharded over the devices: images in [-1, 1] ->
    the posterior mean times the VAE's scaling factor (deterministic, no sampling), float32.
  - `load_or_encode` caches them atomically in `<workdir>/diffusion/latents.npz` with a fingerprint
    (the data's fingerprint and the VAE's checksum and spec); a cache made from other data or another
    VAE is re-encoded. The whole split is held in memory (N x h x w x c float32).
  - `LatentData` serves the cached latents to `pipeline.TrainBatches` in place of the images.
  - `decode_to_images` turns sampled latents back into images in [-1, 1] (clipped).
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from prism_jax.diffusion import vae as vae_lib
from prism_jax.diffusion import vae_import
from prism_jax.io import artifacts, diffusion_store, fs
from prism_jax.parallel import mesh as mesh_lib

LATENTS_FILE = "latents.npz"
PER_DEVICE_BATCH = 16  # images per device of one encoding / decoding batch


def vae_info(vae_dir: str) -> dict[str, Any]:
  """What the stage needs to know about the VAE in `vae_dir` (config.diffusion.vae_dir), from model.json only."""
  if not vae_dir:
    raise ValueError("config.diffusion.vae_dir is '': config.diffusion.space='latent' needs a VAE directory "
                     "(import one with `python -m prism_jax.tools.import_vae`)")
  if not fs.exists(vae_dir) or not fs.isdir(vae_dir):
    raise ValueError(f"config.diffusion.vae_dir={vae_dir!r}: directory not found; expected a VAE imported with "
                     "`python -m prism_jax.tools.import_vae` (a diffusion_store directory)")
  try:
    meta = diffusion_store.load_meta(vae_dir, kind="vae")
    model = vae_lib.create_vae(meta["spec"])
  except (artifacts.ArtifactError, ValueError, TypeError) as err:
    raise ValueError(f"config.diffusion.vae_dir={vae_dir!r}: not a VAE directory ({err})") from None
  return {"dir": vae_dir, "variables_sha256": meta.get("variables_sha256"), "spec": dict(meta["spec"]),
          "downsampling_factor": model.downsampling_factor, "latent_channels": int(model.latent_channels),
          "scaling_factor": float(model.scaling_factor)}


def latent_shape(info: Mapping[str, Any], image_size: int) -> tuple[int, int]:
  """(latent side, latent channels) of `image_size` px images; ValueError when the size does not divide."""
  factor = info["downsampling_factor"]
  if image_size % factor:
    raise ValueError(f"data image size {image_size} px is not divisible by the downsampling factor {factor} of "
                     f"the VAE in config.diffusion.vae_dir={info['dir']!r}; set config.data.image_size to a "
                     f"multiple of {factor}")
  return image_size // factor, info["latent_channels"]


def load_vae(info: Mapping[str, Any]) -> tuple[vae_lib.AutoencoderKL, dict[str, Any]]:
  """(model, variables) of the VAE described by `info` (checksum verified by the store)."""
  model, variables, meta = vae_import.load_vae(info["dir"])
  if meta.get("variables_sha256") != info["variables_sha256"]:
    raise artifacts.ArtifactError(f"{os.path.join(info['dir'], diffusion_store.META_FILE)}: changed while "
                                  "this run read it; rerun")
  return model, variables


def map_batches(fn: Callable, variables: Any, read_rows: Callable[[np.ndarray], np.ndarray], count: int,
                mesh, per_device: int = PER_DEVICE_BATCH) -> np.ndarray:
  """fn(variables, batch) over rows 0..count-1 in global batches sharded over the mesh (the last batch
  padded by repeating row count-1); `read_rows(indices)` gives this process's rows. Returns all rows."""
  num_devices = mesh.devices.size
  batch = min(per_device, -(-count // num_devices)) * num_devices
  rows = mesh_lib.local_batch_slice(batch, mesh)
  replicated, data = mesh_lib.replicated(mesh), mesh_lib.data_sharding(mesh)
  jitted = jax.jit(fn, in_shardings=(replicated, data), out_shardings=replicated)
  variables = mesh_lib.replicate(variables, mesh)
  outs = []
  for start in range(0, count, batch):
    local = np.minimum(np.arange(start, start + batch)[rows], count - 1)
    out = jitted(variables, mesh_lib.put_global_batch(read_rows(local), batch, mesh))
    outs.append(np.asarray(out.addressable_shards[0].data)[:min(batch, count - start)])
  return np.concatenate(outs)


def encode_split(model: vae_lib.AutoencoderKL, variables: Any, dataset, split: str, mesh) -> np.ndarray:
  """(N, h, w, c) float32 scaled latents (posterior mean) of every image of a split."""
  def encode(v, images):
    x = images.astype(jnp.float32) / 127.5 - 1.0
    return vae_lib.encode_to_latents(model, v, x).astype(jnp.float32)
  count = dataset.num_examples(split)
  print(f"[diffusion] encoding the {count} '{split}' images with the VAE (posterior mean)", flush=True)
  return map_batches(encode, variables, lambda idx: dataset.read(split, idx), count, mesh)


def decode_to_images(model: vae_lib.AutoencoderKL, variables: Any, latents: np.ndarray, mesh) -> np.ndarray:
  """Scaled latents (N, h, w, c) -> images (N, H, W, 3) clipped to [-1, 1]."""
  latents = np.asarray(latents, np.float32)

  def decode(v, z):
    return jnp.clip(vae_lib.decode_latents(model, v, z).astype(jnp.float32), -1.0, 1.0)
  return map_batches(decode, variables, lambda idx: latents[idx], len(latents), mesh)


def cache_fingerprint(dataset, split: str, info: Mapping[str, Any]) -> dict[str, Any]:
  """What the cached latents depend on: the data, the split and the VAE (checksum and spec, not its path)."""
  return {"data": dataset.fingerprint(), "split": split,
          "vae": {"variables_sha256": info["variables_sha256"], "spec": info["spec"]}}


def load_or_encode(path: str, fingerprint: Mapping[str, Any], encode: Callable[[], np.ndarray]) -> np.ndarray:
  """The latents cached at `path` when they were made with `fingerprint`; else `encode()`, cached atomically."""
  expected = artifacts.to_jsonable(fingerprint)
  if fs.exists(path):
    with fs.open(path, "rb") as f:
      data = f.read()
    try:
      with np.load(io.BytesIO(data), allow_pickle=False) as z:
        found, latents = json.loads(str(z["fingerprint"])), z["latents"]
    except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as err:
      print(f"[diffusion] {path}: unreadable ({err}); encoding again", flush=True)
    else:
      diffs = artifacts.diff_fields(expected, found)
      if not diffs:
        print(f"[diffusion] reusing {len(latents)} cached latents {tuple(latents.shape[1:])} ({path})", flush=True)
        return latents
      print(f"[diffusion] {path} was made with other {', '.join(diffs[:5])}; encoding again", flush=True)
  latents = np.asarray(encode(), np.float32)
  if jax.process_index() == 0:
    artifacts.write_npz(path, latents=latents, fingerprint=np.array(json.dumps(expected, sort_keys=True)))
  return latents


class LatentData:
  """The cached latents of one split in the shape of a `sources.Dataset` (what `pipeline.TrainBatches` reads)."""

  def __init__(self, dataset, split: str, latents: np.ndarray):
    if len(latents) != dataset.num_examples(split):
      raise ValueError(f"{len(latents)} latents for the {dataset.num_examples(split)} '{split}' images")
    self.name, self.split, self._latents = f"{dataset.name} ({split} latents)", split, latents
    self._labels = dataset.labels(split)

  def _check(self, split: str) -> None:
    if split != self.split:
      raise ValueError(f"split={split!r}: only the '{self.split}' split is encoded")

  def num_examples(self, split: str) -> int:
    self._check(split)
    return len(self._latents)

  def labels(self, split: str) -> np.ndarray:
    self._check(split)
    return self._labels

  def read(self, split: str, indices) -> np.ndarray:
    self._check(split)
    return self._latents[np.asarray(indices, np.int64)]
