"""Quickstart on the embedded `digits` data (no download): a few minutes on a 2-core CPU.

  python -m prism_jax.main --config configs/quickstart.py --workdir workdirs/quickstart

Trains a narrow small-stem ResNet-18 teacher on digits and reports its test accuracy; the later
PRISM stages run here as they land.
"""

from configs import common


def get_config():
  config = common.base_config()
  config.stage = "all"
  config.data = common.data_config(source="digits", name="digits")
  config.squeeze.teachers = ("resnet18",)
  config.squeeze.width = 0.25          # narrow teacher: fast on CPU, ~90%+ on digits
  config.squeeze.epochs = 6
  config.squeeze.batch_size = 64
  config.squeeze.learning_rate = 0.05
  config.squeeze.warmup_epochs = 0.5
  config.squeeze.eval_every_epochs = 2.0
  config.squeeze.log_every_steps = 20
  config.squeeze.checkpoint_every_steps = 50
  config.progress_interval_s = 5.0
  return config
