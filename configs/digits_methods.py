"""Every distillation family on the embedded `digits` data, one run, a few CPU minutes:

  python -m prism_jax.main --config configs/digits_methods.py --workdir workdirs/digits_methods

Squeezes a narrow small-stem ResNet-18 (the RDED observer, the PRISM teacher and the relabel
teacher), trains a tiny pixel-space DiT-T/2 on the digits (the `diffusion` stage, 600 steps), then
makes six sets of 2 images per class at 16 px:
  random_real   real training images (the baseline; random_real_s1 is a second draw, seed 1)
  prism         PRISM recovery (optimization)
  rded          observer-scored crops, 4 per image (selection)
  dps           DiT-scored crops, clustered (selection)
  dit           DDIM + CFG samples of the DiT (generation)
  dap           the same samples guided by the DiT's representativeness prior (generation)
relabels each with the ResNet-18, trains a narrow ResNet-18 student on each and writes
evaluate/report.md, with each set's improvement over the two random draws (IOR). The budgets are toy budgets: this run shows the pipeline, not which method wins
(benchmarks/quality_cifar10.py measures that).
"""

from configs import common


def get_config():
  config = common.base_config()
  config.stage = "all"
  config.data = common.data_config(source="digits", name="digits")
  config.data.image_size = 16        # 8 px digits upscaled: 64 DiT tokens, 8 px stitched cells
  sq = config.squeeze
  sq.teachers = ("resnet18",)
  sq.width = 0.25
  sq.epochs = 3
  sq.batch_size = 64
  sq.learning_rate = 0.1
  sq.warmup_epochs = 0.5
  sq.eval_every_epochs = 0.0
  sq.log_every_steps = 20
  sq.checkpoint_every_steps = 50
  dc = config.diffusion
  dc.model = "T/2"
  dc.steps = 600                 # the diffusion quickstart's budget: rough but recognizable digits
  dc.batch_size = 64
  dc.learning_rate = 1e-3
  dc.ema_decay = 0.99
  dc.log_every_steps = 50
  dc.checkpoint_every_steps = 100
  dc.sample_steps = 25
  rc = config.recover
  rc.ipc = 2
  rc.classes_per_batch = 10
  rc.iterations = 100          # T(i) = 100 - 10 (i mod 8)
  rc.iteration_step = 10
  rc.iterations_per_call = 25
  rc.checkpoint_every_iterations = 100
  rc.remat = False
  config.image_sets = ("random_real",)
  common.add_method(config, "random_real_s1", "random_real", seed=1)   # a second draw: the baseline's spread
  common.add_method(config, "prism", "prism", bn_pool=(), distribution="single", k_max=1)
  common.add_method(config, "rded", "rded", mipc=40, num_crop=5, factor=2)
  common.add_method(config, "dps", "dps", mipc=40, num_crop=2, n_draws=2, feature_block=2, clusters=8,
                    top_clusters=4, factor=2)
  common.add_method(config, "dit", "dit", num_steps=25, per_device_batch=10)
  common.add_method(config, "dap", "dap", num_steps=25, per_device_batch=10, feature_block=2, real_per_class=20,
                    scale=2.0, guide_fraction=0.5)
  common.set_protocol(config, "prism")
  config.relabel.teachers = sq.teachers
  tr = config.train
  tr.width = 0.25
  tr.epochs = 40
  tr.batch_size = 10
  tr.accumulation = 1
  tr.eval_every_epochs = 10.0
  tr.log_every_steps = 20
  tr.checkpoint_every_steps = 40
  config.evaluate.umap = False
  config.evaluate.random_sets = ("random_real", "random_real_s1")   # IOR against both draws
  config.progress_interval_s = 5.0
  return config
