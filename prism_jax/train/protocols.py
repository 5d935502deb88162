"""Evaluation protocols (SPEC 6): relabel + student-training settings that make methods comparable.

`apply(config, name)` sets every field a protocol fixes and records its name in
`config.train.protocol`; results carry that name. `check(config)` guards against a protocol name
that does not describe the settings (e.g. `--config.train.protocol=rd3` typed on the command line
without the rd3 settings): the fields that define a protocol must match it, while sizes (epochs,
batch size, teachers, student) may be shrunk or changed freely. Name a hand-made mix `custom`.
"""

from __future__ import annotations

from prism_jax import errors
from prism_jax.schema import presets

PROTOCOLS, CUSTOM = presets.PROTOCOLS, presets.CUSTOM
_DEFINING = presets.PROTOCOL_DEFINING
apply = presets.set_protocol  # the presets live with the config schema (pure data)
# Values a protocol takes for some students (prism: the official r50/r101 labels), accepted whatever the
# student is (a shrunken or hand-edited config keeps its protocol's name).
_ALSO_ACCEPTED = {("prism", "relabel.aggregation"): ("norm_rescaled_mean", "primary_weighted")}


def _get(config, dotted: str):
  section, field = dotted.split(".")
  value = config[section][field]
  return tuple(value) if isinstance(value, (list, tuple)) else value


def check(config) -> None:
  """Raises ValueError if train.protocol names a preset whose defining fields the config changed."""
  name = config.train.protocol
  if name == CUSTOM:
    return
  if name not in PROTOCOLS:
    raise errors.ConfigError(f"train.protocol={name!r}: expected one of {PROTOCOLS + (CUSTOM,)}")
  import copy
  reference = apply(copy.deepcopy(config), name)
  for field in _DEFINING:
    if _get(config, field) in _ALSO_ACCEPTED.get((name, field), ()):
      continue
    if _get(config, field) != _get(reference, field):
      raise errors.ConfigError(
          f"train.protocol={name!r} but {field}={_get(config, field)!r} (the {name} protocol uses "
          f"{_get(reference, field)!r}); set protocols with configs.common.set_protocol (or a config "
          f"file's argument), or set train.protocol='custom' for a hand-made mix")
