"""Shared presets. Experiment files start from `base_config()` and override only what differs.

Durations are in epochs; the stages convert them to steps at run time from the data size.
Nothing here reads the device count: per-device quantities are derived at run time.
"""

from __future__ import annotations

import ml_collections

STAGES = ("squeeze", "recover", "relabel", "train", "evaluate", "all")


def data_config(source: str = "digits", name: str = "digits", path: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.source = source            # digits | arrays | imagefolder | tfds
  c.name = name                # dataset name (TFDS name for source=tfds); selects normalization
  c.path = path                # directory for arrays (train.npz/test.npz) or imagefolder sources
  c.tfds_data_dir = ""         # '' = TFDS default data_dir
  c.train_split = "train"
  c.test_split = "test"        # imagenet2012 uses 'validation'
  c.image_size = 0             # 0 = the source's native size; else resize shorter side + center crop
  c.max_per_class = 0          # 0 = all; N keeps the first N train images of each class (tiny runs)
  return c


def squeeze_config() -> ml_collections.ConfigDict:
  """Teacher training. Defaults: the CIFAR recipe of the references (SGD 0.1, wd 5e-4, bs 128)."""
  c = ml_collections.ConfigDict()
  c.teachers = ("resnet18",)   # zoo names; each is trained with the recipe below
  c.stem = "small"             # small: 32-64 px inputs; imagenet: torchvision architecture
  c.width = 1.0                # channel multiplier (CPU presets use narrow teachers)
  c.epochs = 200
  c.batch_size = 128           # global batch, split over all devices
  c.optimizer = "sgd"          # sgd | adamw
  c.learning_rate = 0.1
  c.momentum = 0.9
  c.nesterov = False
  c.weight_decay = 5e-4        # not applied to BatchNorm parameters and biases
  c.warmup_epochs = 1.0
  c.label_smoothing = 0.0
  c.augment = "crop_flip"      # crop_flip: pad-4 random crop + flip; rrc_flip: RandomResizedCrop + flip; none
  c.eval_every_epochs = 10.0   # 0: only at the end
  c.eval_batch_size = 256
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 2
  return c


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = "all"              # squeeze | recover | relabel | train | evaluate | all
  c.seed = 0
  c.data = data_config()
  c.mesh = ml_collections.ConfigDict()
  c.mesh.num_devices = -1      # -1: every device of every process
  c.squeeze = squeeze_config()
  c.progress_interval_s = 10.0  # seconds between terminal progress lines
  return c
