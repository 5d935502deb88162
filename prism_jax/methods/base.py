"""The method seam: every way of producing a distilled set is a `Method`, found by name in a registry.

A method has one small interface, called by the distill stage (prism_jax/stages/distill.py) in this
order for each set the config asks for:

  default_settings(config)      its settings section with defaults (a ConfigDict); a set's own
                                overrides (`config.methods.<set>.settings`) are applied on top
  validate(settings, config, field)   every check that needs no data, raising errors.ConfigError
                                naming `<field>.<name>`; runs before any stage starts
  fingerprint(ctx)              what decides the set's images (a dict); a finished set made with
                                another fingerprint is refused, the same one is skipped
  plan(ctx)                     opens what the method needs (teachers, a diffusion model, real
                                images), checks what needs the data, and returns its units
  run(ctx, plan)                makes the set resumably and deterministically (every random draw a
                                function of the seed and the unit, never of scheduling or device
                                count), writes it with `write_set`, and returns fields for the marker
                                (at least `num_images`)

The stage owns everything else: the skip-if-done check, the in-progress fingerprint (run.json), the
completion marker with the sizes and checksums of the set's files, progress lines and timing. A new
method is one module with a `Method` subclass plus one line in prism_jax/methods/__init__.py (or,
outside the package, a module named in `config.method_modules` that calls `register`).

Units are the method's own: a class chunk at an IPC index for the recover methods (and DAP); a
class's candidate crops for patch-selection methods (RDED, DPS). `ctx.unit_dir` is where a method
keeps finished units so a killed run resumes per unit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import ml_collections
import numpy as np

from prism_jax import errors
from prism_jax.io import layout
from prism_jax.recover import export


@dataclasses.dataclass(frozen=True)
class SetRequest:
  """One set the config asks the distill stage to make."""
  name: str                        # the set's name (config.image_sets)
  method: str                      # registry name
  settings: ml_collections.ConfigDict  # resolved: defaults, preset and the set's overrides
  field: str                       # where the settings come from, for messages ('recover', 'methods.x.settings')


@dataclasses.dataclass
class Context:
  """What a method may use while making one set."""
  config: ml_collections.ConfigDict   # the whole run's config (seed, data, precision, progress interval)
  request: SetRequest
  workdir: str
  dataset: Any                        # data.sources.Dataset
  mesh: Any
  teachers_dir: str

  @property
  def settings(self) -> ml_collections.ConfigDict:
    return self.request.settings

  @property
  def out_dir(self) -> str:
    """Where the set is written (the recover layout)."""
    return layout.distilled_dir(self.workdir, self.request.name)

  @property
  def unit_dir(self) -> str:
    """Where the method keeps finished units (resume per unit)."""
    import os
    return os.path.join(self.out_dir, "units")

  @property
  def tag(self) -> str:
    """The prefix of the set's progress lines."""
    name = self.request.name
    return "recover" if name == layout.RECOVER_SET else f"distill {name}"

  @property
  def tensorboard_dir(self) -> str:
    return layout.tensorboard_dir(self.workdir, layout.distill_run_name(self.request.name))


class Method:
  """Base class of the methods; subclasses set `name` and implement the interface above."""

  name: str = ""
  description: str = ""

  def default_settings(self, config) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict()

  def validate(self, settings, config, field: str) -> None:
    pass

  def fingerprint(self, ctx: Context) -> dict:
    raise NotImplementedError

  def plan(self, ctx: Context) -> Any:
    raise NotImplementedError

  def run(self, ctx: Context, plan: Any) -> dict:
    raise NotImplementedError


def write_set(ctx: Context, images_u8: np.ndarray, labels: np.ndarray, ipc_indices: np.ndarray,
              manifest: Sequence[dict], **kwargs) -> None:
  """Writes a set in the recover layout (images/<class>/ipcNNNN.png, images.npz, manifest.jsonl with
  one record per image in the method's own fields, classes.json), images in (IPC index, class)
  order; `kwargs` go to recover.export.write_outputs (JPEG export). Only process 0 writes (the
  distill stage waits for it before any process moves on)."""
  from prism_jax.parallel import multihost
  if len(manifest) != len(images_u8) or len(labels) != len(images_u8):
    raise ValueError(f"write_set: {len(images_u8)} images, {len(labels)} labels, {len(manifest)} manifest "
                     "records: expected one of each per image")
  if not multihost.is_main_process():
    return
  export.write_outputs(ctx.out_dir, images_u8, np.asarray(labels), np.asarray(ipc_indices),
                       ctx.dataset.class_names, manifest, **kwargs)


SET_FILES = (layout.IMAGES_FILE, layout.MANIFEST_FILE, "classes.json")
"""The files of a set the completion marker vouches for (sizes and checksums)."""

_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
  """Adds `method` under `method.name` (a name may be registered once)."""
  if not method.name:
    raise ValueError(f"{type(method).__name__}: a method needs a name")
  if method.name in _REGISTRY and type(_REGISTRY[method.name]) is not type(method):
    raise ValueError(f"method name {method.name!r} is already registered ({type(_REGISTRY[method.name]).__name__})")
  _REGISTRY[method.name] = method
  return method


def get(name: str, field: str = "method") -> Method:
  if name not in _REGISTRY:
    raise errors.ConfigError(f"{field}={name!r}: unknown method; known methods: {', '.join(sorted(_REGISTRY))}")
  return _REGISTRY[name]


def names() -> tuple[str, ...]:
  return tuple(sorted(_REGISTRY))


def apply_overrides(settings: ml_collections.ConfigDict, overrides, field: str) -> ml_collections.ConfigDict:
  """`settings` with `overrides` set field by field; an unknown field is a ConfigError naming it."""
  for key, value in (overrides.items() if overrides is not None else ()):
    if key not in settings:
      raise errors.ConfigError(f"{field}.{key}: not a setting of this method (settings: "
                               f"{', '.join(sorted(settings.keys()))})")
    if isinstance(settings[key], ml_collections.ConfigDict):
      apply_overrides(settings[key], value, f"{field}.{key}")
    else:
      settings[key] = tuple(value) if isinstance(value, list) else value
  return settings
