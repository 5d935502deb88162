"""Named presets: the recover methods (paper Table 2 rows and baselines) and the evaluation protocols.

Pure data like `sections.py` (ml_collections only). A recover method is a *delta*: the fields of
`config.recover` that define it. `set_recover_method` resets the method-defining fields to PRISM's
and applies a method's delta (single-method experiment files); a method instance of a multi-method
config (`config.methods.<name>`, see sections.add_method) applies only its delta on top of the shared
`config.recover`, then its own overrides.
"""

from __future__ import annotations

import ml_collections

PRISM_POOL = ("mobilenet_v2", "efficientnet_b0", "shufflenet_v2_x0_5", "alexnet")
RECOVER_METHODS = ("prism", "prism_uniform", "prism_intra", "sre2l", "single_pre", "decoupled_pre",
                   "decoupled_intra", "multi_k2", "multi_k3", "multi_k4")
# The fields every recover method defines, at PRISM's values (set_recover_method starts here).
_PRISM_BASE = dict(logit_teacher="resnet18", bn_primary="", bn_pool=PRISM_POOL, distribution="bernoulli",
                   strategy="pre", k_max=4, p=0.5, init="real", learning_rate=0.05, iteration_step=500,
                   logit_pool=(), fixed_teachers=())


def recover_method_delta(method: str) -> dict:
  """The `config.recover` fields that define recover method `method` (relative to PRISM's).

  prism            official PRISM: bernoulli extras (p 0.5, k_max 4), drawn once per IPC index
  prism_uniform    paper eq. 5: uniform over subsets with the primary and up to 3 extras
  prism_intra      logit teacher and BN set re-drawn every iteration (G-VBSM-like ablation)
  sre2l            one teacher for logits and BN, noise init, lr 0.25, constant T
  single_pre       PRISM's recipe (real init, lr 0.05, varying T) with resnet18 alone for logits and BN
  decoupled_pre/intra  logit teacher resnet18 and one *other* BN teacher (mobilenet_v2,
                   efficientnet_b0 or shufflenet_v2_x0_5), drawn per IPC index / per iteration
  multi_kK         logit resnet18 + fixed BN set resnet18 + the first K-1 pool members
  """
  if method == "prism":
    return {}
  if method == "prism_uniform":
    return dict(distribution="uniform_subsets", include_primary=True)
  if method == "prism_intra":
    return dict(strategy="intra", logit_pool=PRISM_POOL)
  if method == "sre2l":
    return dict(distribution="single", init="noise", learning_rate=0.25, iteration_step=0)
  if method == "single_pre":
    return dict(distribution="single")
  if method in ("decoupled_pre", "decoupled_intra"):
    return dict(distribution="uniform_subsets", k_max=1, include_primary=False, bn_primary=PRISM_POOL[0],
                bn_pool=PRISM_POOL[1:3], strategy="pre" if method == "decoupled_pre" else "intra")
  if method.startswith("multi_k") and method in RECOVER_METHODS:
    k = int(method[len("multi_k"):])
    return dict(distribution="fixed", fixed_teachers=("resnet18",) + PRISM_POOL[:k - 1], k_max=k)
  raise ValueError(f"recover method {method!r}: expected one of {RECOVER_METHODS}")


def set_recover_method(config: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
  """Sets config.recover for a named method (see recover_method_delta)."""
  delta = recover_method_delta(method)
  rc = config.recover
  for field, value in {**_PRISM_BASE, **delta}.items():
    rc[field] = value
  return config


PROTOCOLS = ("prism", "sre2l", "rd3", "hard_label")
LARGE_STUDENTS = ("resnet50", "resnet101")  # students the prism protocol relabels with their own architecture
CUSTOM = "custom"
# Fields that define each protocol (everything else may be customized under the same name).
PROTOCOL_DEFINING = ("relabel.aggregation", "relabel.rrc_scale", "relabel.patch_shuffle_grid", "relabel.cutmix",
                     "relabel.flip", "train.loss", "train.schedule")


def set_protocol(config, protocol: str):
  """One switch for the evaluation protocol (relabel + student training), SPEC 6.

  prism  4-teacher norm-rescaled soft labels, RRC 0.25-1 + flip + CutMix, mse_gt (gamma 0.1),
         batch 50 (2 micro-batches), 300 epochs, prism_cos2 (zeta 2.5); for a ResNet-50/101 student
         (set train.student first) the official r50/r101 labels: that architecture replaces resnet18
         as the first teacher, aggregated by `primary_weighted`
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
    if tr.student in LARGE_STUDENTS:  # the official r50/r101 relabel scripts: the student's own
      rl.teachers = (tr.student,) + rl.teachers[1:]  # architecture first, weighted 0.5
      rl.aggregation = "primary_weighted"
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
