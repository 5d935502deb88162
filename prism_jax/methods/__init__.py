"""Every way of producing a distilled set, by name (the interface: methods/base.py).

  recover          the PRISM-family recovery exactly as `config.recover` describes it
  prism, prism_uniform, prism_intra, sre2l, single_pre, decoupled_pre, decoupled_intra,
  multi_k2..4      the same engine with a named preset (schema/presets.py) on top of `config.recover`
  random_real      IPC real training images per class, drawn with a seed (the baseline)
  rded             RDED: observer-scored real crops, stitched (selection)
  dps              DPS: diffusion-scored real crops, clustered (selection; needs a DiT)
  dit              class-conditional DiT samples, DDIM + CFG (generation; needs a DiT)
  dap              DAP: DiT samples guided by the representativeness prior (generation; needs a DiT)

Which sets a run makes: each name in `config.image_sets` that is
  - a key of `config.methods` -> that instance's `method`, with its `settings` overrides;
  - 'recover'                 -> method 'recover';
  - 'random_real'             -> method 'random_real';
  - a directory               -> nothing to make (another run's images.npz is read as it is).
"""

from __future__ import annotations

import copy
import importlib

from prism_jax import errors
from prism_jax.io import layout
from prism_jax.methods import base
from prism_jax.methods.base import Context, Method, SetRequest, get, names, register  # noqa: F401 (the API)
from prism_jax.methods import prism as _prism, random_real as _random_real  # noqa: E402  (registry lines)
from prism_jax.methods import dps as _dps, generate as _generate, rded as _rded  # noqa: E402

for _name in _prism.METHOD_NAMES:
  register(_prism.RecoverMethod(_name))
register(_random_real.RandomRealMethod())
register(_rded.RdedMethod())
register(_dps.DpsMethod())
register(_generate.DitMethod())
register(_generate.DapMethod())

_LOADED_PLUGINS: set[str] = set()


def load_plugins(config) -> None:
  """Imports the modules named in `config.method_modules` (each registers its methods)."""
  for module in config.get("method_modules", ()) or ():
    if module in _LOADED_PLUGINS:
      continue
    try:
      importlib.import_module(module)
    except ImportError as e:
      raise errors.ConfigError(f"method_modules: cannot import {module!r} ({e})") from None
    _LOADED_PLUGINS.add(module)


def _instances(config) -> dict:
  return dict(config.get("methods", {}) or {})


def requests(config) -> list[SetRequest]:
  """The sets this run makes, in `config.image_sets` order, with their resolved settings."""
  load_plugins(config)
  instances = _instances(config)
  sets = tuple(config.image_sets)
  for name in instances:
    if name not in sets:
      raise errors.ConfigError(f"methods.{name}: not in image_sets={sets}; add it there (configs.common.add_method "
                               "does both) or remove the entry")
  out = []
  for name in sets:
    if layout.is_directory_set(name):
      continue
    if name in instances:
      instance = instances[name]
      if "method" not in instance:
        raise errors.ConfigError(f"methods.{name}.method is missing: expected one of {', '.join(names())}")
      method_name, overrides, field = instance["method"], instance.get("settings"), f"methods.{name}.settings"
      method = get(method_name, f"methods.{name}.method")
    elif name in (layout.RECOVER_SET, _random_real.NAME):
      method_name, overrides, field = name, None, "recover" if name == layout.RECOVER_SET else name
      method = get(method_name)
    else:
      raise errors.ConfigError(
          f"image_sets: {name!r} is not a set this run can make: expected 'recover', 'random_real', a name "
          f"in config.methods ({', '.join(instances) or 'none'}), or a directory holding an images.npz; "
          f"methods: {', '.join(names())}")
    settings = method.default_settings(config)
    settings = base.apply_overrides(copy.deepcopy(settings), overrides, field)
    settings.lock()
    out.append(SetRequest(name, method_name, settings, field))
  return out


def validate(config) -> list[SetRequest]:
  """Resolves and validates every set of the run (no data read); returns the requests."""
  out = requests(config)
  for request in out:
    get(request.method).validate(request.settings, config, request.field)
  return out
