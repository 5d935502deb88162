"""The diffusion model a selection or generation method stands on (DPS, DAP, plain DiT sampling): the
DiT that a work directory's diffusion stage trained or checked, its class map onto the data's classes,
and (latent space) the VAE that encodes real images and decodes samples.

`resolve_model` / `resolve_vae` read what the diffusion stage recorded (`imported.json` for an imported
DiT, the trained model's model.json otherwise); `load` builds a `Prior` with everything checked:
a model whose classes are not the data's (and no class map), or whose input is not the data's pixels
or the VAE's latents of them, is refused naming the file.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prism_jax.diffusion import dit as dit_lib
from prism_jax.diffusion import dit_import, latents as latents_lib
from prism_jax.diffusion import schedule as schedule_lib
from prism_jax.diffusion import vae as vae_lib
from prism_jax.io import artifacts, diffusion_store, fs, layout


def resolve_model(workdir: str) -> tuple[str, tuple[int, ...] | None]:
  """(DiT directory, class map or None) that this work directory's diffusion stage provides."""
  marker = layout.diffusion_import_record(workdir)
  if fs.exists(marker):
    info = artifacts.read_json(marker)
    return info["import_dir"], (tuple(info["class_map"]) if info.get("class_map") else None)
  if diffusion_store.is_complete(layout.diffusion_model_dir(workdir)):
    return layout.diffusion_model_dir(workdir), None
  raise artifacts.ArtifactError(f"{layout.diffusion_dir(workdir)}: no DiT here; run the diffusion stage first "
                                "(config.diffusion.model to train one, config.diffusion.import_dir to use an "
                                "imported one)")


def resolve_vae(workdir: str) -> dict | None:
  """{'dir', 'variables_sha256', ...} of the VAE whose latent space this work directory's DiT works in, or
  None for a pixel-space DiT (read from imported.json or the trained model's model.json)."""
  marker = layout.diffusion_import_record(workdir)
  if fs.exists(marker):
    info = artifacts.read_json(marker)
  else:
    resolve_model(workdir)
    info = diffusion_store.load_meta(layout.diffusion_model_dir(workdir), kind="dit")
  return info.get("vae") if info.get("space") == "latent" else None


@dataclasses.dataclass(frozen=True, eq=False)
class Prior:
  """A loaded DiT (+ VAE) and how the data's classes and images map onto it."""
  model: dit_lib.DiT
  variables: Any                    # {'params': ...}
  model_dir: str
  class_map: np.ndarray             # (num data classes,) model class index of each data class
  vae: vae_lib.AutoencoderKL | None
  vae_variables: Any
  schedule: schedule_lib.DiffusionSchedule = dataclasses.field(default_factory=schedule_lib.DiffusionSchedule.linear)

  @property
  def shape(self) -> tuple[int, int, int]:
    """One model input's (H, W, C)."""
    return (self.model.input_size, self.model.input_size, self.model.in_channels)

  @property
  def null_label(self) -> int:
    return int(self.model.num_classes)

  def model_labels(self, data_labels) -> np.ndarray:
    return self.class_map[np.asarray(data_labels, np.int64)].astype(np.int32)

  def encode(self, vae_variables, images_u8: jax.Array) -> jax.Array:
    """uint8 images (B, S, S, 3) -> what the DiT sees (pixels in [-1, 1], or scaled posterior-mean latents)."""
    x = images_u8.astype(jnp.float32) / 127.5 - 1.0
    if self.vae is None:
      return x
    return vae_lib.encode_to_latents(self.vae, vae_variables, x).astype(jnp.float32)

  def decode(self, vae_variables, z: jax.Array) -> jax.Array:
    """Model-space samples -> images in [-1, 1] (clipped)."""
    if self.vae is None:
      return jnp.clip(z.astype(jnp.float32), -1.0, 1.0)
    return jnp.clip(vae_lib.decode_latents(self.vae, vae_variables, z).astype(jnp.float32), -1.0, 1.0)


def _class_map(meta: dict, class_map, dataset, meta_path: str) -> np.ndarray:
  num_model_classes = int(meta["spec"].get("num_classes", 0))
  if class_map is not None:
    cm = np.asarray(class_map, np.int64)
    if len(cm) != dataset.num_classes or cm.min() < 0 or cm.max() >= num_model_classes:
      raise artifacts.ArtifactError(f"{meta_path}: the recorded class map {tuple(cm)} does not map the data's "
                                    f"{dataset.num_classes} classes into the DiT's {num_model_classes}; rerun the "
                                    "diffusion stage")
    return cm
  names = meta.get("class_names")
  if names is not None and list(names) != list(dataset.class_names) or num_model_classes != dataset.num_classes:
    raise artifacts.ArtifactError(
        f"{meta_path}: the DiT's {num_model_classes} classes {list(names or [])[:10]} are not the data's "
        f"{dataset.num_classes} classes {list(dataset.class_names)[:10]}, and no class map was recorded; use it "
        "through config.diffusion.import_dir with config.diffusion.class_map")
  return np.arange(dataset.num_classes)


def load(workdir: str, dataset) -> Prior:
  """The work directory's DiT (and VAE) with its class map, checked against the data."""
  model_dir, class_map = resolve_model(workdir)
  meta_path = os.path.join(model_dir, diffusion_store.META_FILE)
  meta = diffusion_store.load_meta(model_dir, kind="dit")
  cm = _class_map(meta, class_map, dataset, meta_path)
  vae_record = resolve_vae(workdir)
  vae, vae_variables = None, None
  if vae_record is None:
    want = (dataset.image_size, 3)
  else:
    info = latents_lib.vae_info(vae_record["dir"])
    want = latents_lib.latent_shape(info, dataset.image_size)
    vae, vae_variables = latents_lib.load_vae(info)
  spec = meta["spec"]
  if (int(spec["input_size"]), int(spec["in_channels"])) != tuple(want):
    raise artifacts.ArtifactError(f"{meta_path}: the DiT takes {spec['input_size']}x{spec['input_size']}x"
                                  f"{spec['in_channels']} inputs, but the data's {dataset.image_size} px images give "
                                  f"{want[0]}x{want[0]}x{want[1]}")
  model, variables, _ = dit_import.load_dit(model_dir)
  return Prior(model=model, variables=variables, model_dir=model_dir, class_map=cm, vae=vae,
               vae_variables=vae_variables)


def variables_fingerprint(workdir: str) -> dict:
  """What decides the prior without loading it (for a method's fingerprint)."""
  model_dir, class_map = resolve_model(workdir)
  meta = diffusion_store.load_meta(model_dir, kind="dit")
  vae = resolve_vae(workdir)
  return {"dit": meta.get("variables_sha256"), "vae": None if vae is None else vae.get("variables_sha256"),
          "class_map": None if class_map is None else [int(c) for c in class_map]}
