"""Every experiment config in configs/: it loads (every parameter), validates, holds the values its
docstring promises, and runs its documented stages in a shrunken form.

Shrunken runs keep every setting of a config (teacher selection and strategy, init, iteration
schedule, augmentation, protocol, loss, schedule, views, aggregation, stage list) except size and
location: the data become a tiny arrays set (4 classes, 16 px), zoo teachers and students become
tiny registered models (a zoo name always maps to the same tiny name), IPC 2, 2 recovery
iterations, 1 epoch, batches of 4-8, one squeezed teacher per recipe (the others random);
`test_shrink_changes_only_sizes_names_and_locations` checks that nothing else changes.

Runs are grouped by what they exercise. The stages form three blocks (squeeze; recover;
relabel + train + evaluate), and each block has features: the code paths its settings select
(e.g. recover: distribution, strategy, init, crop/flip/roll, BN-less teacher in the pool; numbers
such as learning rates, k, zeta are values on a path). A block runs for an experiment only if one of
its features has not been exercised by an earlier run; every experiment then asserts that each of
its features ran and checks those runs' artifacts (manifest teachers per the selection rule,
iteration schedule, soft-label views, protocol, report); when written, 12 block runs cover 43 experiments.
Compilation dominates, so this module has a compilation cache of its own and runs on one device (sharding is tested elsewhere).
"""

import copy
import glob
import importlib
import json
import os
import shutil

import jax
import numpy as np
import pytest
from absl import flags
from jax.experimental.compilation_cache import compilation_cache
from ml_collections import config_flags

import recover_utils as ru
from configs import common, presets
from prism_jax import config_checks, models, stages
from prism_jax.data import stats
from prism_jax.io import artifacts, layout, teacher_store
from prism_jax.parallel import mesh as mesh_lib
from prism_jax.recover import plan as recover_plan
from prism_jax.relabel import plan as relabel_plan
from prism_jax.stages import train


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO_ROOT, "configs")
HELPER_MODULES = ("common", "presets")  # shared presets, not experiments

# Zoo name -> tiny stand-in: one conv-BN-relu block (none for alexnet's stand-in: no BatchNorm), the
# smallest program with the zoo's interface. Distinct names stay distinct, so teacher pools keep their size.
TINY = {"resnet18": "cfg_tiny_r18", "mobilenet_v2": "cfg_tiny_mbv2", "efficientnet_b0": "cfg_tiny_effb0",
        "shufflenet_v2_x0_5": "cfg_tiny_shuffle", "alexnet": "cfg_tiny_alexnet", "resnet50": "cfg_tiny_r50",
        "resnet101": "cfg_tiny_r101"}
for _zoo, _name in TINY.items():
  if _name not in models.available_models():
    models.register_model(_name, lambda depth=int(_zoo != "alexnet"), **kw: ru.TinyTeacher(depth=depth, **kw))
TINY_STUDENT = TINY["resnet18"]
NUM_CLASSES, PER_CLASS, IPC = 4, 4, 2
DIFFUSION_METHODS = ("dps", "dit", "dap")
# The only fields the shrink may change (sizes, names of models, where data and teachers are).
SHRUNK_FIELDS = {
    "data.*", "progress_interval_s",
    "squeeze.teachers", "squeeze.epochs", "squeeze.batch_size", "squeeze.eval_batch_size",
    "squeeze.eval_every_epochs", "squeeze.log_every_steps", "squeeze.checkpoint_every_steps",
    "recover.ipc", "recover.classes_per_batch", "recover.iterations", "recover.iteration_step",
    "recover.iterations_per_call", "teachers_dir", "recover.logit_teacher", "recover.bn_primary",
    "recover.bn_pool", "recover.fixed_teachers", "recover.logit_pool", "recover.teacher_pieces",
    "relabel.teachers",
    "train.student", "train.epochs", "train.batch_size", "train.eval_every_epochs", "train.eval_batch_size",
    "train.log_every_steps", "train.checkpoint_every_steps",
    "evaluate.reference_model", "evaluate.umap",
    "methods.*",  # the teacher names and candidate / step counts in a multi-method config's per-set settings
    "diffusion.*",  # a random tiny pixel-space DiT in place of a trained or imported one
}


# --------------------------------------------------------------------------------------------
# Loading.

def config_modules() -> list[str]:
  names = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(CONFIG_DIR, "*.py")))
  return [n for n in names if n not in HELPER_MODULES and not n.startswith("_")]


def _module(name: str):
  return importlib.import_module(f"configs.{name}")


def experiments() -> list[tuple[str, str | None]]:
  """(module, parameter) for every experiment: each ARGS entry, or None for plain files."""
  return [(name, arg) for name in config_modules() for arg in getattr(_module(name), "ARGS", (None,))]


def load(name: str, arg: str | None):
  module = _module(name)
  return module.get_config(arg) if arg is not None else module.get_config()


def exp_id(name: str, arg: str | None) -> str:
  return name if arg is None else f"{name}:{arg}"


EXPERIMENTS = experiments()


def documented_stages(config) -> tuple[str, ...]:
  """The stages the docstring's command runs."""
  return stages.sequence(config.stage)


def test_every_config_file_is_a_documented_experiment():
  assert {"imagenet_prism", "imagenet_table2", "imagenet_baselines", "imagenet_rd3", "cifar10_prism",
          "cifar100_prism", "tiny_imagenet_prism", "quickstart"} <= set(config_modules())
  for name in config_modules():
    module = _module(name)
    doc = module.__doc__ or ""
    assert callable(getattr(module, "get_config", None)), name
    assert f"python -m prism_jax.main --config configs/{name}.py" in doc, name
    args = getattr(module, "ARGS", None)
    if args is None:
      continue
    # Parametrized files: the command names a real parameter, a cloud command and a cost estimate.
    assert len(set(args)) == len(args) > 0, name
    assert any(f"configs/{name}.py:{a} " in doc for a in args), name
    assert "launch/gpu_vm.sh run" in doc and "estimate" in doc and "H100" in doc, name
    if load(name, args[0]).stage != "all":  # ImageNet: recover and the stages after it, one command
      # (the diffusion configs start one stage earlier, to check the imported DiT)
      assert load(name, args[0]).stage in (presets.IMAGENET_STAGE, "diffusion+") and presets.IMAGENET_STAGE == "recover+", name
    with pytest.raises(ValueError, match=f"configs/{name}.py: parameter 'nope': expected one of"):
      module.get_config("nope")


@pytest.mark.parametrize("name,arg", EXPERIMENTS, ids=[exp_id(*e) for e in EXPERIMENTS])
def test_config_loads_and_validates(name, arg):
  config = load(name, arg)
  config_checks.validate(config)
  spec = recover_plan.selection_spec(config.recover)
  relabel_plan.check_config(config)
  train.validate(config)
  assert spec.logit_teacher in models.available_models()
  for model in (spec.all_logit_teachers() + spec.all_bn_teachers() + tuple(config.relabel.teachers)
                + tuple(config.squeeze.teachers) + (config.train.student, config.evaluate.reference_model)):
    assert model in models.available_models(), (name, model)
  assert config.train.protocol in common.PROTOCOLS
  if config.data.name != "digits":
    assert stats.for_dataset(config.data.name) is not None  # the references' normalization constants
  if "squeeze" not in stages.sequence(config.stage) and "distill" in stages.sequence(config.stage):
    # No squeeze: the teachers are imported, and nothing must train them into the work directory.
    assert config.teachers_dir != ""
  locked = copy.deepcopy(config)
  locked.lock()  # what main's --config flag does: overrides of unknown fields are refused
  with pytest.raises(AttributeError):
    locked.recover.no_such_field = 1


def test_path_colon_parameter_through_the_config_flag():
  argv = ["prog", f"--config={CONFIG_DIR}/imagenet_prism.py:ipc50_r50", "--config.stage=train",
          "--config.train.seeds=(0, 1, 2)"]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "experiment", flag_values=values, lock_config=True,
                                  sys_argv=argv)  # as main.py's flag, reading this argv instead of sys.argv
  values(argv)
  config = values.config
  assert (config.recover.ipc, config.train.student, config.stage, tuple(config.train.seeds)) == (
      50, "resnet50", "train", (0, 1, 2))


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
  return out


def test_imagenet_prism_values():
  c = load("imagenet_prism", "ipc50_r50")
  assert (c.recover.ipc, c.train.student, c.train.protocol, c.data.image_size) == (50, "resnet50", "prism", 224)
  assert (c.data.source, c.data.name, c.data.test_split, c.train.stem) == ("tfds", "imagenet2012", "validation",
                                                                            "imagenet")
  rc = c.recover
  assert (rc.logit_teacher, rc.bn_pool, rc.distribution, rc.strategy, rc.k_max, rc.p) == (
      "resnet18", common.PRISM_POOL, "bernoulli", "pre", 4, 0.5)
  assert common.PRISM_POOL == ("mobilenet_v2", "efficientnet_b0", "shufflenet_v2_x0_5", "alexnet")
  assert (rc.init, rc.learning_rate, rc.iterations, rc.iteration_step, rc.iteration_period, rc.jitter) == (
      "real", 0.05, 4000, 500, 8, -1)
  assert recover_plan.jitter_pixels(rc, c.data.image_size) == 32
  assert c.teachers_dir == presets.IMAGENET_TEACHERS_DIR
  tr, rl = c.train, c.relabel
  assert (tr.loss, tr.gamma, tr.batch_size, tr.accumulation, tr.epochs, tr.schedule, tr.zeta) == (
      "mse_gt", 0.1, 50, 2, 300, "prism_cos2", 2.5)
  # The official r50 relabel script: ResNet-50 first, weighted 0.5 (relabel/aggregate.py).
  assert (rl.teachers, rl.aggregation, rl.rrc_scale) == (
      ("resnet50", "mobilenet_v2", "alexnet", "shufflenet_v2_x0_5"), "primary_weighted", (0.25, 1.0))
  for ipc in presets.IMAGENET_IPCS:
    for short, student in presets.STUDENTS.items():
      other = load("imagenet_prism", f"ipc{ipc}_{short}")
      assert (other.recover.ipc, other.train.student) == (ipc, student)
      # The nine experiments differ in IPC and student only (and, as the official r50/r101 relabel
      # scripts do, a ResNet-50/101 student's labels lead with its own architecture, weighted 0.5).
      diff = {k for k, v in _flat(other.to_dict()).items() if _flat(c.to_dict())[k] != v}
      assert diff <= {"recover.ipc", "train.student", "relabel.teachers", "relabel.aggregation"}
      first, aggregation = ("resnet18", "norm_rescaled_mean") if student == "resnet18" else (student, "primary_weighted")
      assert other.relabel.teachers == (first, "mobilenet_v2", "alexnet", "shufflenet_v2_x0_5")
      assert other.relabel.aggregation == aggregation


def test_table2_rows_differ_only_in_recovery():
  module = _module("imagenet_table2")
  rows = {arg: load("imagenet_table2", arg) for arg in module.METHODS}
  reference = _flat(rows["prism"].to_dict())
  for arg, c in rows.items():
    diff = {k for k, v in _flat(c.to_dict()).items() if reference[k] != v}
    assert all(k.startswith("recover.") for k in diff), (arg, diff)
    assert (c.recover.ipc, c.train.student, c.train.protocol) == (10, "resnet18", "prism")
    # The recovery-only variant: the same recovery at IPC 50, students on hard labels.
    hard = load("imagenet_table2", arg + "_hard")
    hard_diff = {k for k, v in _flat(hard.to_dict()).items() if _flat(c.to_dict())[k] != v}
    assert all(k.startswith(("train.", "relabel.")) for k in hard_diff - {"recover.ipc"}), (arg, hard_diff)
    assert (hard.recover.ipc, hard.train.protocol, hard.train.loss, hard.relabel.teachers) == (
        50, "hard_label", "ce", ())
    assert relabel_plan.uses_hard_labels_only(hard) and not relabel_plan.uses_hard_labels_only(c)
  sre2l = rows["sre2l"].recover
  assert (sre2l.distribution, sre2l.init, sre2l.learning_rate, sre2l.iteration_step) == (
      "single", "noise", 0.25, 0)
  assert rows["single_pre"].recover.distribution == "single" and rows["single_pre"].recover.init == "real"
  for arg, strategy in (("decoupled_pre", "pre"), ("decoupled_intra", "intra")):
    spec = recover_plan.selection_spec(rows[arg].recover)
    assert rows[arg].recover.strategy == strategy and spec.logit_teacher == "resnet18"
    assert "resnet18" not in spec.all_bn_teachers() and spec.k_max == 1  # one BN teacher, not the logit one
  for k in (2, 3, 4):
    rc = rows[f"multi_k{k}"].recover
    assert rc.distribution == "fixed" and len(rc.fixed_teachers) == k and rc.fixed_teachers[0] == "resnet18"
  assert rows["prism_uniform"].recover.distribution == "uniform_subsets"
  assert rows["prism_intra"].recover.strategy == "intra" and rows["prism_intra"].recover.logit_pool


def test_baseline_and_rd3_values():
  s = load("imagenet_baselines", "sre2l_ipc50")
  assert (s.recover.ipc, s.recover.distribution, s.recover.init, s.recover.learning_rate) == (
      50, "single", "noise", 0.25)
  assert (s.train.protocol, s.train.loss, s.train.temperature, s.train.batch_size, s.train.schedule) == (
      "sre2l", "kl", 20.0, 1024, "cosine")
  assert (s.relabel.teachers, s.relabel.aggregation, s.relabel.rrc_scale) == (
      ("resnet18",), "single", (0.08, 1.0))
  i = load("imagenet_baselines", "intra_ipc100")
  assert (i.recover.ipc, i.recover.strategy, i.train.protocol, i.recover.logit_pool) == (
      100, "intra", "prism", common.PRISM_POOL)
  r18, r101 = load("imagenet_rd3", "ipc10_r18"), load("imagenet_rd3", "ipc50_r101")
  assert r18.image_sets == ("recover", "random_real")
  assert (r18.train.protocol, r18.train.batch_size, r18.train.zeta, r18.train.epochs) == ("rd3", 50, 1.0, 400)
  assert (r101.recover.ipc, r101.train.student, r101.train.batch_size, r101.train.zeta) == (
      50, "resnet101", 100, 2.0)
  assert (r101.train.schedule, r101.train.loss, r101.relabel.patch_shuffle_grid, r101.relabel.rrc_scale) == (
      "smoothed_cosine", "kl", 2, (0.5, 1.0))


def test_comparison_batches_fit_the_sets():
  """Every budget's student batch fits its sets (CIFAR-10: 10 classes x IPC images); the hard-label
  protocol's 128 becomes the soft protocol's 50 at IPC 10 and stays at IPC 50."""
  for arg, ipc in (("small", 10), ("small_hard", 10), ("small_ipc50", 50), ("large", 10)):
    c = load("cifar10_compare", arg)
    assert c.train.batch_size <= 10 * ipc, arg
  assert (load("cifar10_compare", "small_hard").train.batch_size, load("cifar10_compare", "small").train.batch_size) == (
      50, 50)
  compare = importlib.import_module("configs.cifar10_compare")
  hard50 = compare.make_config(compare.BUDGETS["small"], ipc=50, protocol="hard_label")
  assert (hard50.train.batch_size, hard50.train.accumulation) == (128, 1)


def test_small_dataset_values():
  c10, c100 = load("cifar10_prism", "ipc10"), load("cifar100_prism", "ipc50")
  tiny = load("tiny_imagenet_prism", "ipc100")
  for c in (c10, c100, tiny):
    assert c.stage == "all" and c.squeeze.teachers == presets.PRISM_TEACHERS
    assert (c.squeeze.stem, c.train.stem, c.train.student, c.train.protocol) == (
        "small", "small", "resnet18", "prism")
    assert (c.recover.distribution, c.recover.init, c.recover.learning_rate, c.recover.r_bn) == (
        "bernoulli", "real", 0.05, 0.01)
  assert (c10.data.source, c10.data.name, c10.data.path, c10.recover.ipc) == (
      "arrays", "cifar10", "data/cifar10", 10)
  assert (c100.data.source, c100.data.name, c100.recover.ipc) == ("tfds", "cifar100", 50)
  for c in (c10, c100):
    sq, rc = c.squeeze, c.recover
    assert (sq.learning_rate, sq.weight_decay, sq.batch_size, sq.epochs, sq.augment) == (
        0.1, 5e-4, 128, 200, "crop_flip")
    assert (rc.jitter, rc.flip, rc.rrc_scale, rc.iterations, rc.iteration_step) == (
        4, False, (1.0, 1.0), 1000, 125)
  # CIFAR-100 is CIFAR-10 with other data (so one shrunken run covers both).
  diff = {k for k, v in _flat(c100.to_dict()).items() if _flat(c10.to_dict())[k] != v}
  assert diff <= {"data.source", "data.name", "data.path", "data.tfds_data_dir", "recover.ipc"}
  assert (tiny.data.source, tiny.data.name, tiny.data.image_size, tiny.data.test_split, tiny.recover.ipc) == (
      "imagefolder", "tiny_imagenet", 64, "val", 100)
  sq, rc = tiny.squeeze, tiny.recover
  assert (sq.learning_rate, sq.weight_decay, sq.batch_size, sq.epochs, sq.warmup_epochs, sq.augment) == (
      0.2, 1e-4, 256, 50, 5, "rrc_flip")
  assert (rc.jitter, rc.flip, rc.rrc_scale, rc.iterations, rc.iteration_step) == (8, True, (0.08, 1.0), 4000, 500)


# --------------------------------------------------------------------------------------------
# Shrunken runs.

def _tiny(name: str) -> str:
  return TINY.get(name, name)


def shrink(config, assets):
  """The config at toy size: every setting kept except data, model names and sizes (SHRUNK_FIELDS)."""
  c = copy.deepcopy(config)
  c.data = common.data_config(source="arrays", name="tiny", path=assets["data"])
  imported = bool(c.teachers_dir)  # ImageNet configs read imported teachers; others squeeze theirs
  sq = c.squeeze
  sq.teachers = (_tiny(sq.teachers[0]),)  # one teacher per recipe; the others are random tiny ones
  sq.epochs, sq.batch_size, sq.eval_batch_size, sq.eval_every_epochs = 1.0, 8, 8, 0.0
  sq.log_every_steps, sq.checkpoint_every_steps = 1, 100
  rc = c.recover
  rc.ipc, rc.classes_per_batch = IPC, 2
  rc.iterations, rc.iteration_step, rc.iterations_per_call = 2, min(rc.iteration_step, 1), 2
  rc.logit_teacher, rc.bn_primary = _tiny(rc.logit_teacher), _tiny(rc.bn_primary)
  for field in ("bn_pool", "fixed_teachers", "logit_pool"):
    rc[field] = tuple(_tiny(t) for t in rc[field])
  rc.teacher_pieces = ",".join(f"{_tiny(n)}={k}" for n, _, k in
                               (item.partition("=") for item in rc.teacher_pieces.split(",") if item))
  for instance in c.methods.values():  # a multi-method config: teacher names in the sets' own settings
    for field, value in instance.settings.items():
      if field in ("logit_teacher", "bn_primary"):
        instance.settings[field] = _tiny(value)
      elif field in ("bn_pool", "fixed_teachers", "logit_pool"):
        instance.settings[field] = tuple(_tiny(t) for t in value)
  rl = c.relabel
  rl.teachers = tuple(_tiny(t) for t in rl.teachers)
  if imported:
    c.teachers_dir = assets["teachers"]
  tr = c.train
  tr.student, tr.epochs, tr.batch_size = TINY_STUDENT, 1, 4
  tr.eval_every_epochs, tr.eval_batch_size, tr.log_every_steps, tr.checkpoint_every_steps = 1.0, 8, 1, 100
  dc = c.diffusion
  if dc.model or dc.import_dir:  # a random tiny pixel-space DiT stands in (Runner writes it)
    dc.model, dc.import_dir, dc.vae_dir, dc.space, dc.class_map = "T/2", "", "", "pixel", ()
  for instance in c.methods.values():  # the selection / generation methods' sizes
    sizes = {"rded": {"mipc": PER_CLASS, "factor": 1},
             # factor 1: at IPC 2 stitching would take 4 crops of 8 candidates per class (the tiny data has 4)
             "dps": {"mipc": PER_CLASS, "n_draws": 1, "feature_block": 2, "factor": 1},
             "dit": {"num_steps": 2}, "dap": {"num_steps": 2, "feature_block": 2, "real_per_class": PER_CLASS}}
    for field, value in sizes.get(instance.method, {}).items():
      instance.settings[field] = value
    if "observer" in instance.settings:
      instance.settings.observer = _tiny(instance.settings.observer)
  c.evaluate.reference_model = _tiny(c.evaluate.reference_model)
  c.evaluate.umap = False      # umap-learn's start-up outlasts this file; test_quickstart covers UMAP
  c.progress_interval_s = 0.0
  return c


# What a block's stages do differently from config to config: the code paths its settings select.
# Numbers (learning rates, k, p, zeta, T, crop scales, recipe constants) are values on the same path,
# so configs that differ only in them share one run of the block.
def squeeze_signature(c) -> dict:
  sq = c.squeeze
  return {"optimizer": sq.optimizer, "nesterov": sq.nesterov, "augment": sq.augment,
          "label_smoothing": sq.label_smoothing > 0, "warmup": sq.warmup_epochs > 0}


def recover_signature(c) -> dict:
  rc = c.recover
  pool = set(recover_plan.selection_spec(rc).all_bn_teachers())
  return {"distribution": rc.distribution, "strategy": rc.strategy, "granularity": rc.granularity,
          "init": rc.init, "include_primary": rc.distribution == "uniform_subsets" and rc.include_primary,
          "logit_pool": bool(rc.logit_pool), "count_bn_only": rc.count_bn_only,
          "bn_less_teacher": TINY["alexnet"] in pool, "varying_iterations": rc.iteration_step > 0,
          "crop": tuple(rc.rrc_scale) != (1.0, 1.0), "flip": rc.flip, "roll": rc.jitter != 0,
          "priors": (rc.tv_weight > 0, rc.l2_weight > 0),
          "execution": (rc.sequential_teachers, rc.remat, rc.export_jpeg, rc.ipc_start > 0),
          # each method of a multi-method config is a code path of its own (not their combination)
          **{f"method_{m.method}": True for m in c.methods.values()}}


def downstream_signature(c) -> dict:
  rl, tr, ev = c.relabel, c.train, c.evaluate
  return {"image_sets": (len(c.image_sets) > 1, any(layout.is_directory_set(n) for n in c.image_sets)),
          "ranking": bool(ev.random_sets) and any(n in c.image_sets for n in ev.random_sets), "mode": rl.mode, "aggregation": rl.aggregation,
          "ensemble": len(rl.teachers) > 1, "views": (rl.flip, rl.cutmix, rl.patch_shuffle_grid > 0),
          "loss": tr.loss, "schedule": tr.schedule, "optimizer": tr.optimizer,
          "accumulation": tr.accumulation > 1, "ema": tr.ema_decay > 0, "seeds": len(tr.seeds) > 1,
          "warmup": tr.warmup_epochs > 0, "report": (ev.umap, bool(ev.compare_workdirs))}


def blocks_of(config) -> list[tuple[str, tuple[str, ...], dict]]:
  """(block, its stages, its code-path features) in pipeline order, for the blocks the documented
  command runs."""
  run = documented_stages(config)
  blocks = [("squeeze", ("squeeze",), squeeze_signature), ("recover", ("distill",), recover_signature),
            ("downstream", ("relabel", "train", "evaluate"), downstream_signature)]
  return [(block, tuple(s for s in block_stages if s in run), sign(config))
          for block, block_stages, sign in blocks if set(block_stages) & set(run)]


_OUTPUTS = {"squeeze": "teachers", "recover": "recover"}  # what a later block reads from an earlier one


def _feature(block: str, name: str, value) -> str:
  return json.dumps([block, name, value])


class Runner:
  """Runs a block of an experiment only when one of its features (code-path settings) has not been
  exercised by an earlier run of that block; otherwise the experiment is covered by the runs that
  exercised them, and copies their outputs when a later block of its own still has to run."""

  def __init__(self, root, assets):
    self.root, self.assets = root, assets
    self.runs = []               # (block, features, workdir, results, shrunken config that ran)
    self.exercised = {}          # feature -> index in self.runs of the run that exercised it first
    self.mesh = mesh_lib.make_mesh(1)

  def _missing(self, block, features) -> bool:
    return any(_feature(block, k, v) not in self.exercised for k, v in features.items())

  def ensure(self, name, arg) -> tuple:
    """(shrunken config, {block: [the runs that exercised its features]})."""
    config = shrink(load(name, arg), self.assets)
    blocks = blocks_of(config)
    missing = [i for i, (block, _, features) in enumerate(blocks) if self._missing(block, features)]
    if missing:
      workdir = str(self.root / exp_id(name, arg).replace(":", "_"))
      if not config.teachers_dir:  # teachers in the work directory: all but the squeezed one random
        for teacher in set(TINY.values()) - set(config.squeeze.teachers):
          shutil.copytree(os.path.join(self.assets["teachers"], teacher),
                          os.path.join(workdir, "teachers", teacher))
      for i, (block, block_stages, features) in enumerate(blocks[:missing[-1] + 1]):
        if i not in missing:     # covered: take the outputs of the latest run of this block
          src = [r for r in self.runs if r[0] == block][-1][2]
          outputs = [_OUTPUTS[block]] + (glob.glob("sets/*/distill", root_dir=src) if block == "recover" else [])
          for output in outputs:
            if os.path.exists(os.path.join(src, output)):
              shutil.copytree(os.path.join(src, output), os.path.join(workdir, output), dirs_exist_ok=True)
          made = os.path.join(workdir, "sets", "random_real", "distill", "set.json")
          if block == "recover" and "random_real" in config.image_sets and not os.path.exists(made):
            baseline = copy.deepcopy(config)
            baseline.image_sets = ("random_real",)
            stages.run_stage("distill", baseline, workdir, self.mesh)
          continue
        if block == "recover" and any(m.method in DIFFUSION_METHODS for m in config.methods.values()):
          ru.write_random_dit(workdir, ru.CLASS_NAMES[:NUM_CLASSES])  # what the diffusion stage would make
        results = {s: stages.run_stage(s, config, workdir, self.mesh) for s in block_stages}
        self.runs.append((block, features, workdir, results, config))
        for k, v in features.items():
          self.exercised.setdefault(_feature(block, k, v), len(self.runs) - 1)
    covering = {}
    for block, _, features in blocks:
      indices = sorted({self.exercised[_feature(block, k, v)] for k, v in features.items()})
      covering[block] = [self.runs[i] for i in indices]
    return config, covering


@pytest.fixture(scope="module")
def fast_compilation(tmp_path_factory):
  """For this module only: a compilation cache in a fresh directory, so programs that recur under new
  jit objects (the per-image-set relabel and student steps, a teacher set shared by several configs)
  compile once."""
  settings = {"jax_compilation_cache_dir": str(tmp_path_factory.mktemp("xla_cache")),
              "jax_persistent_cache_min_compile_time_secs": 0.0,
              "jax_persistent_cache_min_entry_size_bytes": 0}
  before = {k: jax.config.values[k] for k in settings}
  compilation_cache.reset_cache()
  for k, v in settings.items():
    jax.config.update(k, v)
  yield
  for k, v in before.items():
    jax.config.update(k, v)
  compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def runner(tmp_path_factory, fast_compilation):
  root = tmp_path_factory.mktemp("config_runs")
  data = ru.write_tiny_arrays(str(root / "data"), per_class=PER_CLASS, num_classes=NUM_CLASSES)
  teachers = ru.write_random_teachers(str(root / "teachers"), sorted(set(TINY.values())))
  return Runner(root / "runs", {"data": data, "teachers": teachers})


def test_shrink_changes_only_sizes_names_and_locations(runner):
  for name, arg in EXPERIMENTS:
    original, shrunk = load(name, arg), shrink(load(name, arg), runner.assets)
    before, after = _flat(original.to_dict()), _flat(shrunk.to_dict())
    changed = {k for k in before if k.startswith("data.") or before[k] != after[k]}
    allowed = {k for k in changed if k in SHRUNK_FIELDS or k.split(".")[0] + ".*" in SHRUNK_FIELDS}
    assert changed == allowed, (name, arg, changed - allowed)
    assert documented_stages(shrunk) == documented_stages(original)


def _check_recover(config, workdir):
  rc = config.recover
  spec = recover_plan.selection_spec(rc)
  lines = [json.loads(line) for line in open(os.path.join(workdir, "recover", "manifest.jsonl"))]
  assert len(lines) == IPC * NUM_CLASSES
  for line in lines:
    bn = tuple(line["bn_teachers"])
    assert line["strategy"] == rc.strategy and line["logit_teacher"] == spec.logit_teacher
    assert line["iterations"] == rc.iterations - rc.iteration_step * (line["ipc_index"] % rc.iteration_period)
    assert np.isfinite(line["final_ce"]) and len(set(bn)) == len(bn)
    if rc.strategy == "intra":  # a unit may use any teacher of the pools: draws happen per iteration
      assert set(bn) == set(spec.all_bn_teachers())
    elif rc.distribution == "single":
      assert bn == (spec.bn_primary,)
    elif rc.distribution == "fixed":
      assert bn == tuple(spec.fixed_teachers)
    elif rc.distribution == "bernoulli":
      assert bn[0] == spec.bn_primary and len(bn) <= rc.k_max and set(bn[1:]) <= set(spec.bn_pool)
    else:
      assert 1 <= len(bn) <= rc.k_max and set(bn) <= set(spec.all_bn_teachers())
      assert not rc.include_primary or bn[0] == spec.bn_primary


def _check_downstream(config, workdir, results):
  for image_set in config.image_sets:
    relabel_dir = os.path.join(workdir, "sets", image_set, "relabel")
    if relabel_plan.uses_hard_labels_only(config):  # recovery-only rows: nothing relabeled
      assert results["relabel"][image_set] == {"mode": "hard_labels"} and not os.path.exists(relabel_dir)
    else:
      labels = artifacts.read_json(os.path.join(relabel_dir, "labels.json"))
      assert labels["complete"] and labels["fingerprint"]["aggregation"] == config.relabel.aggregation
      assert labels["fingerprint"]["views"]["patch_shuffle_grid"] == config.relabel.patch_shuffle_grid
    summary = results["train"][image_set]
    assert summary["protocol"] == config.train.protocol and 0.0 <= summary["best_top1"]["mean"] <= 1.0
  report = results["evaluate"]
  assert [r["method"] for r in report["rows"]] == list(config.image_sets)
  assert report["protocol"] == config.train.protocol and report["report"] == os.path.join("evaluate", "report.md")
  assert os.path.exists(os.path.join(workdir, report["report"]))  # stored relative to the work directory


def _recover_teacher_count(experiment) -> int:
  spec = recover_plan.selection_spec(load(*experiment).recover)
  return len(set(spec.all_logit_teachers() + spec.all_bn_teachers()))


# Larger teacher sets first: a smaller program that recurs later (multi_k4 after decoupled_pre: the
# same four teachers) then comes out of the compilation cache.
RUN_ORDER = sorted(EXPERIMENTS, key=lambda e: -_recover_teacher_count(e))


@pytest.mark.parametrize("name,arg", RUN_ORDER, ids=[exp_id(*e) for e in RUN_ORDER])
def test_config_runs_shrunken(runner, name, arg):
  config, covering = runner.ensure(name, arg)
  assert list(covering) == [block for block, _, _ in blocks_of(config)]
  for block, _, features in blocks_of(config):
    for k, v in features.items():  # every code path of this config ran in one of the covering runs
      assert any(run_features.get(k) == v for _, run_features, _, _, _ in covering[block]), (block, k, v)
  for block, _, workdir, results, ran in covering.get("squeeze", []):
    assert set(results["squeeze"]) == set(ran.squeeze.teachers)
    assert teacher_store.is_complete(os.path.join(workdir, "teachers", ran.squeeze.teachers[0]))
  for block, _, workdir, results, ran in covering.get("recover", []):
    assert set(results["distill"]) == {s for s in ran.image_sets if "/" not in s}
    assert all(made["num_images"] == IPC * NUM_CLASSES for made in results["distill"].values())
    if "recover" in results["distill"]:
      _check_recover(ran, workdir)
  for block, _, workdir, results, ran in covering.get("downstream", []):
    _check_downstream(ran, workdir, results)


def test_runs_were_shared(runner):
  """Run after the others: every experiment was covered by far fewer block runs."""
  if len(runner.runs) < 5:
    pytest.skip("run the whole file to see the sharing")
  total = sum(len(blocks_of(shrink(load(*e), runner.assets))) for e in EXPERIMENTS)
  assert len(runner.runs) < total / 4


def test_stage_names_single_stages_ranges_and_lists():
  assert stages.sequence("all") == stages.PIPELINE
  assert stages.sequence("recover+") == stages.sequence("distill+") == ("distill", "relabel", "train", "evaluate")
  assert stages.sequence("recover") == ("distill",)  # the former name of the distill stage
  assert stages.sequence("evaluate+") == ("evaluate",)
  assert stages.sequence("relabel, train") == ("relabel", "train")
  assert stages.sequence("train") == ("train",)
  for bad in ("recovr+", "bogus", "", "train,train"):
    with pytest.raises(ValueError, match="expected a stage of"):
      stages.sequence(bad)
  with pytest.raises(ValueError, match="in pipeline order"):
    stages.sequence("train,relabel")
  config = load("quickstart", None)
  config.stage = "relabel+train"
  with pytest.raises(ValueError, match=r"config.stage='relabel\+train'"):
    config_checks.validate(config)
