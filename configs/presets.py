"""Presets that several experiment files share (datasets, ImageNet teachers, parameter strings).

`configs/common.py` holds the method presets (recover methods, evaluation protocols); this module
builds on them for the experiment files of configs/:

  imagenet_config(...)       ImageNet-1K at 224 px with teachers imported from torchvision
  small_prism_config(...)    PRISM on 32-64 px data with small-stem teachers squeezed in the run
  choose(arg, args, file)    the parameter string of a `configs/<file>.py:<arg>` experiment

Nothing here reads the device count.
"""

from __future__ import annotations

import ml_collections

from configs import common

# The zoo models PRISM uses: logit teacher + BN pool (recover) and the 4-teacher relabel ensemble.
PRISM_TEACHERS = ("resnet18",) + common.PRISM_POOL
# Where the ImageNet configs read imported torchvision teachers, relative to the repository root
# (on a VM: ~/prism_jax/teachers/imagenet1k, e.g. filled by `--sync-from gs://BUCKET/teachers/imagenet1k:...`).
IMAGENET_TEACHERS_DIR = "teachers/imagenet1k"
IMAGENET_STAGE = "recover+"  # recover and every later stage: squeeze never runs on ImageNet
STUDENTS = {"r18": "resnet18", "r50": "resnet50", "r101": "resnet101"}
IMAGENET_IPCS = (10, 50, 100)
# Parameter strings `ipc<N>_r<depth>` of the ImageNet experiments with one student and one IPC.
IPC_STUDENT_ARGS = tuple(f"ipc{ipc}_{s}" for ipc in IMAGENET_IPCS for s in STUDENTS)


def choose(arg: str | None, args, config_file: str) -> str:
  """`arg` if it names one of `args`, else a ValueError that lists them."""
  if arg not in args:
    raise ValueError(f"{config_file}: parameter {arg!r}: expected one of {tuple(args)}, as in "
                     f"--config={config_file}:{args[0]}")
  return arg


def parse_ipc_student(arg: str) -> tuple[int, str]:
  """'ipc50_r50' -> (50, 'resnet50')."""
  ipc, student = arg.split("_")
  return int(ipc[len("ipc"):]), STUDENTS[student]


def imagenet_data(source: str = "tfds") -> ml_collections.ConfigDict:
  """ImageNet-1K (TFDS `imagenet2012`, prepared from the manually downloaded archives)."""
  c = common.data_config(source=source, name="imagenet2012")  # name selects the torchvision mean/std
  c.tfds_data_dir = "tfds"     # relative to the repository root: `tfds build imagenet2012 --data_dir=tfds ...`
  c.image_size = 224           # both splits: Resize 256 + CenterCrop 224, the references' eval view
  c.test_split = "validation"  # TFDS name of the 50,000-image validation split
  return c


def imagenet_config(*, ipc: int, student: str = "resnet18", method: str = "prism",
                    protocol: str = "prism") -> ml_collections.ConfigDict:
  """ImageNet-1K: recover `method` at `ipc`, relabel + train `student` under `protocol`.

  Teachers are torchvision ImageNet weights imported into IMAGENET_TEACHERS_DIR (README,
  "torchvision weights"); the squeeze stage is never run: `stage` is IMAGENET_STAGE, recover and
  every stage after it.
  """
  config = common.base_config()
  config.stage = IMAGENET_STAGE  # not 'all': that would train a ResNet-18 teacher from scratch first
  config.data = imagenet_data()
  common.set_recover_method(config, method)
  rc = config.recover
  rc.ipc = ipc
  rc.classes_per_batch = 100   # the official cross-class recovery batch: 100 classes x 1 image
  config.teachers_dir = IMAGENET_TEACHERS_DIR
  if "efficientnet_b0" in recover_teachers(rc):
    # At 224 px EfficientNet-B0's backward pass needs ~1.7x ResNet-18's activation memory; in two
    # pieces (exact same gradient, one extra forward) it stays within the logit teacher's.
    rc.teacher_pieces = "efficientnet_b0=2"
  tr = config.train
  tr.student = student
  tr.stem = "imagenet"         # torchvision architecture, trained from scratch
  common.set_protocol(config, protocol)  # after the student: rd3 picks batch size and zeta from it
  return config


def recover_teachers(rc) -> tuple[str, ...]:
  """Every teacher a recover config may draw (its logit teachers, then its BN teachers), as
  prism_jax.recover.selection.SelectionSpec lists them (repeated here: configs import no runtime code)."""
  primary = rc.bn_primary or rc.logit_teacher
  if rc.distribution == "fixed":
    bn = tuple(rc.fixed_teachers)
  elif rc.distribution == "single":
    bn = (primary,)
  else:
    bn = (primary,) + tuple(rc.bn_pool)
  return tuple(dict.fromkeys((rc.logit_teacher,) + tuple(rc.logit_pool) + bn))


def small_prism_config(ipc: int) -> ml_collections.ConfigDict:
  """PRISM on 32-64 px data: squeeze the five PRISM teachers (small stem), recover, relabel, train
  a small-stem ResNet-18 under the prism protocol, evaluate. The dataset files set `data`, the
  squeeze recipe and the recovery augmentation/schedule of their resolution."""
  config = common.base_config()
  config.stage = "all"         # every stage in order, squeeze included
  sq = config.squeeze
  sq.teachers = PRISM_TEACHERS  # logit teacher + BN pool of recover, and the relabel ensemble
  sq.stem = "small"            # 3x3 stride-1 first conv, no max-pool (SRe2L's CIFAR/Tiny ResNet-18)
  common.set_recover_method(config, "prism")
  config.recover.ipc = ipc
  common.set_protocol(config, "prism")
  config.train.stem = "small"
  return config


def cifar_recovery(config):
  """SRe2L's CIFAR recovery augmentation with PRISM's varying T, shared by CIFAR-10 and CIFAR-100."""
  rc = config.recover
  rc.rrc_scale = (1.0, 1.0)    # no random-resized crop (the whole image), as SRe2L's CIFAR recovery
  rc.flip = False              # SRe2L's CIFAR recovery: roll only
  rc.jitter = 4                # roll 0-4 px at 32 px (32 px at 224)
  rc.iterations = 1000         # T(i) = 1000 - 125 (i mod 8): 1000, 875, ..., 125
  rc.iteration_step = 125
  return config
