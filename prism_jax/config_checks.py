"""Validation of config values that ml_collections' type checks cannot catch."""

from __future__ import annotations

from prism_jax import stages

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
