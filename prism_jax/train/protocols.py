"""Evaluation protocols (SPEC 6): relabel + student-training settings that make methods comparable.

`apply(config, name)` sets every field a protocol fixes and records its name in
`config.train.protocol`; results carry that name. `check(config)` guards against a protocol name
that does not describe the settings (e.g. `--config.train.protocol=rd3` typed on the command line
without the rd3 settings): the fields that define a protocol must match it, while sizes (epochs,
batch size, teachers, student) may be shrunk or changed freely. Name a hand-made mix `custom`.
"""

from __future__ import annotations

PROTOCOLS = ("prism", "sre2l", "rd3", "hard_label")
CUSTOM = "custom"

# Fields that define each protocol (everything else may be customized under the same name).
_DEFINING = ("relabel.aggregation", "relabel.rrc_scale", "relabel.patch_shuffle_grid", "relabel.cutmix",
             "relabel.flip", "train.loss", "train.schedule")


def apply(config, protocol: str):
  """One switch for the evaluation protocol (relabel + student training), SPEC 6.

  prism  4-teacher norm-rescaled soft labels, RRC 0.25-1 + flip + CutMix, mse_gt (gamma 0.1),
         batch 50 (2 micro-batches), 300 epochs, prism_cos2 (zeta 2.5)
  sre2l  resnet18 soft labels, RRC 0.08-1 + flip + CutMix, KL (T 20), cosine, 300 epochs
         (batch 1024 on ImageNet; set train.batch_size)
  rd3    resnet18 soft labels, PatchShuffle (2x2) + RRC 0.5-1 + flip + CutMix, KL (T 20), 400 epochs,
         batch 50 and smoothed cosine zeta 1 for a resnet18 student, else batch 100 and zeta 2
  hard_label  no teachers, no soft labels (the paper's "recovery-only" Table 2 setting): CE on the
         images' own classes, RRC 0.08-1 + flip (no CutMix: a mixed view has no single hard label),
         cosine, batch 128, 300 epochs. The paper does not state this recipe; these are our choices.
  """
  rl, tr = config.relabel, config.train
  tr.protocol = protocol
  tr.optimizer, tr.learning_rate, tr.weight_decay, tr.accumulation, tr.ema_decay = "adamw", 1e-3, 0.01, 1, 0.0
  rl.flip, rl.cutmix, rl.patch_shuffle_grid = True, True, 0
  if protocol == "prism":
    rl.teachers = ("resnet18", "mobilenet_v2", "alexnet", "shufflenet_v2_x0_5")
    rl.aggregation, rl.rrc_scale = "norm_rescaled_mean", (0.25, 1.0)
    tr.loss, tr.gamma, tr.batch_size, tr.accumulation, tr.epochs = "mse_gt", 0.1, 50, 2, 300
    tr.schedule, tr.zeta = "prism_cos2", 2.5
  elif protocol == "sre2l":
    rl.teachers, rl.aggregation, rl.rrc_scale = ("resnet18",), "single", (0.08, 1.0)
    tr.loss, tr.temperature, tr.batch_size, tr.epochs = "kl", 20.0, 1024, 300
    tr.schedule, tr.zeta = "cosine", 0.0
  elif protocol == "rd3":
    rl.teachers, rl.aggregation, rl.rrc_scale, rl.patch_shuffle_grid = ("resnet18",), "single", (0.5, 1.0), 2
    tr.loss, tr.temperature, tr.epochs, tr.schedule = "kl", 20.0, 400, "smoothed_cosine"
    small = tr.student == "resnet18"
    tr.batch_size, tr.zeta = (50, 1.0) if small else (100, 2.0)
  elif protocol == "hard_label":
    rl.teachers, rl.aggregation, rl.rrc_scale, rl.cutmix = (), "mean", (0.08, 1.0), False
    tr.loss, tr.batch_size, tr.epochs, tr.schedule, tr.zeta = "ce", 128, 300, "cosine", 0.0
  else:
    raise ValueError(f"train.protocol={protocol!r}: expected one of {PROTOCOLS}")
  return config



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
    raise ValueError(f"train.protocol={name!r}: expected one of {PROTOCOLS + (CUSTOM,)}")
  import copy
  reference = apply(copy.deepcopy(config), name)
  for field in _DEFINING:
    if _get(config, field) != _get(reference, field):
      raise ValueError(
          f"train.protocol={name!r} but {field}={_get(config, field)!r} (the {name} protocol uses "
          f"{_get(reference, field)!r}); set protocols with configs.common.set_protocol (or a config "
          f"file's argument), or set train.protocol='custom' for a hand-made mix")
