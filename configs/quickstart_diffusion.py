"""Quickstart of the diffusion stage: a tiny class-conditional DiT on the embedded `digits` data.

  python -m prism_jax.main --config configs/quickstart_diffusion.py --workdir workdirs/quickstart_diffusion

Trains DiT-T/2 (4 blocks, 64 wide, 0.4M parameters) in pixel space on the 1437 digits training
images at 16 px (the 8 px originals upscaled), 600 steps of batch 64, then writes
diffusion/model/ (the EMA weights) and diffusion/samples.png (4 DDIM + CFG samples per digit).
About 4 minutes on a shared 2-core CPU (measured 3m57s: 10 s compilation, 205 s of training at
~180 img/s, then the sample grid). The fixed-batch evaluation loss (ε-MSE; ~1.0 at initialization)
falls to 0.10 at step 50 and 0.036 at step 600 (EMA weights: 0.83 -> 0.033); the samples are rough
but mostly recognizable digits.
"""

from configs import common


def get_config():
  config = common.base_config()
  config.stage = "diffusion"
  config.data = common.data_config(source="digits", name="digits")
  config.data.image_size = 16    # digits are 8 px upscaled: 16 px keeps every detail, 64 DiT tokens
  dc = config.diffusion
  dc.model = "T/2"
  dc.steps = 600
  dc.batch_size = 64
  dc.learning_rate = 1e-3        # tiny model, short run
  dc.ema_decay = 0.99            # DiT's 0.9999 averages over far more steps than this run has
  dc.log_every_steps = 50
  dc.checkpoint_every_steps = 200
  dc.sample_steps = 50
  dc.cfg_scale = 4.0
  dc.samples_per_class = 4
  config.progress_interval_s = 10.0
  return config
