"""Quickstart on the embedded `digits` data (no download), a few minutes on a 2-core CPU.

  python -m prism_jax.main --config configs/quickstart.py --workdir workdirs/quickstart

Squeezes three narrow small-stem teachers on digits (ResNet-18, MobileNetV2, ShuffleNetV2-0.5),
then recovers 2 images per class with PRISM (ResNet-18 logits; BN priors from ResNet-18 plus
bernoulli-drawn extras), with short iteration counts, relabels the recovered set and the same
number of random real images with the three teachers, trains a narrow ResNet-18 student on each,
and writes evaluate/report.md (results table, image grid, UMAP plots).
"""

from configs import common


def get_config():
  config = common.base_config()
  config.stage = "all"
  config.data = common.data_config(source="digits", name="digits")
  sq = config.squeeze
  sq.teachers = ("resnet18", "mobilenet_v2", "shufflenet_v2_x0_5")
  sq.width = 0.25              # narrow teachers: fast on CPU
  sq.epochs = 3
  sq.batch_size = 64
  sq.learning_rate = 0.1
  sq.warmup_epochs = 0.5
  sq.eval_every_epochs = 0.0   # evaluate once, at the end
  sq.log_every_steps = 20
  sq.checkpoint_every_steps = 50
  common.set_recover_method(config, "prism")
  rc = config.recover
  rc.bn_pool = ("mobilenet_v2", "shufflenet_v2_x0_5")  # the extras squeezed above
  rc.k_max = 3                 # primary + up to 2 bernoulli extras
  rc.ipc = 2
  rc.classes_per_batch = 10    # all 10 digits in one recovery batch
  rc.iterations = 200          # T(i) = 200 - 50 * (i mod 2): 200, 150
  rc.iteration_step = 50
  rc.iteration_period = 2
  rc.iterations_per_call = 25
  rc.checkpoint_every_iterations = 100
  rc.remat = False             # memory is no concern here; skip the recomputation
  # Relabel + student training under the PRISM protocol, shrunk: compare the recovered set with
  # the same number of random real images (RD3's strong baseline).
  config.image_sets = ("recover", "random_real")
  common.set_protocol(config, "prism")
  config.relabel.teachers = sq.teachers  # the teachers squeezed above
  tr = config.train
  tr.width = 0.25
  tr.epochs = 40
  tr.batch_size = 10           # 20 images per set: 2 batches per epoch
  tr.accumulation = 1
  tr.eval_every_epochs = 10.0
  tr.log_every_steps = 20
  tr.checkpoint_every_steps = 40
  config.progress_interval_s = 5.0
  return config
