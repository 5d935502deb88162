"""Validation of config values that ml_collections' type checks cannot catch."""

from __future__ import annotations

from prism_jax import stages
from prism_jax.train import precision

_POSITIVE = {
    "squeeze.epochs": float, "squeeze.batch_size": int, "squeeze.eval_batch_size": int,
    "squeeze.learning_rate": float, "squeeze.log_every_steps": int, "squeeze.checkpoint_every_steps": int,
    "squeeze.keep_checkpoints": int,
}


def _get(config, dotted: str):
  value = config
  for part in dotted.split("."):
    value = value[part]
  return value


def validate(config) -> None:
  """Raises ValueError naming the first invalid field and what was expected."""
  try:
    stages.sequence(config.stage)
  except ValueError as e:
    raise ValueError(f"config.{e}") from None
  precision.validate(config)
  for field in _POSITIVE:
    if _get(config, field) <= 0:
      raise ValueError(f"config.{field}={_get(config, field)!r}: expected a positive number")
  sq = config.squeeze
  if sq.stem not in ("small", "imagenet"):
    raise ValueError(f"config.squeeze.stem={sq.stem!r}: expected 'small' or 'imagenet'")
  if sq.width <= 0:
    raise ValueError(f"config.squeeze.width={sq.width!r}: expected a positive multiplier")
  if not sq.teachers:
    raise ValueError("config.squeeze.teachers is empty: expected at least one model name")
  for field in ("weight_decay", "warmup_epochs", "label_smoothing", "eval_every_epochs", "momentum"):
    if sq[field] < 0:
      raise ValueError(f"config.squeeze.{field}={sq[field]!r}: expected >= 0")
  if "diffusion" in config:
    _validate_diffusion(config.diffusion)


def _validate_diffusion(dc) -> None:
  """config.diffusion (the diffusion stage); the batch's divisibility by the devices is checked at run time."""
  from prism_jax.diffusion import dit

  if dc.model and dc.import_dir:
    raise ValueError(f"config.diffusion.model={dc.model!r} and config.diffusion.import_dir={dc.import_dir!r}: "
                     "set one of them (model trains a DiT, import_dir uses an imported one)")
  if dc.model:
    try:
      dit.dit_spec(dc.model, input_size=64, in_channels=3, num_classes=1)
    except ValueError:
      raise ValueError(f"config.diffusion.model={dc.model!r}: expected '' (no training) or a DiT size name "
                       f"'<size>/<patch>' with size in {', '.join(dit.DIT_SIZES)}, e.g. 'T/2', 'S/2', 'B/2'") from None
  if dc.space not in ("pixel", "latent"):
    raise ValueError(f"config.diffusion.space={dc.space!r}: expected 'pixel' or 'latent'")
  for field in ("steps", "batch_size", "learning_rate", "log_every_steps", "checkpoint_every_steps",
                "keep_checkpoints", "sample_steps", "samples_per_class"):
    if dc[field] <= 0:
      raise ValueError(f"config.diffusion.{field}={dc[field]!r}: expected a positive number")
  if dc.sample_every_steps < 0 or (dc.sample_every_steps and dc.sample_every_steps % dc.log_every_steps):
    raise ValueError(f"config.diffusion.sample_every_steps={dc.sample_every_steps!r}: expected 0 (only the final "
                     f"grid) or a multiple of config.diffusion.log_every_steps={dc.log_every_steps}")
  if dc.weight_decay < 0:
    raise ValueError(f"config.diffusion.weight_decay={dc.weight_decay!r}: expected >= 0")
  if dc.cfg_scale < 0:
    raise ValueError(f"config.diffusion.cfg_scale={dc.cfg_scale!r}: expected >= 0 (1 = no guidance)")
  for field in ("ema_decay", "label_dropout"):
    if not 0 <= dc[field] < 1:
      raise ValueError(f"config.diffusion.{field}={dc[field]!r}: expected a value in [0, 1)")
  if dc.class_map and not dc.import_dir:
    raise ValueError("config.diffusion.class_map is set but config.diffusion.import_dir is '': the class map "
                     "applies to an imported DiT only")
