"""Student losses (SPEC 6): PRISM/G-VBSM `mse_gt` and SRe2L `kl` distill teacher logits; `ce` trains
on the hard labels alone (the paper's recovery-only Table 2 setting: no knowledge distillation).

Both follow the official PyTorch reductions (`Brian-Moser/prism` validate/train_FKD_parallel.py
L346, L396-L403) and are computed in float32, since stored teacher logits arrive as float16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from prism_jax import errors

LOSSES = ("mse_gt", "kl", "ce")
# Losses that read no teacher logits: no relabel stage, no teachers in the student step.
HARD_LABEL_LOSSES = ("ce",)


def _as_f32(*arrays):
  return tuple(jnp.asarray(a).astype(jnp.float32) for a in arrays)


def mse_gt(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array,
           gamma: float) -> jax.Array:
  """F.mse_loss(z_s, z_t) (mean over all B x C entries) + gamma * mean CE(z_s, hard label y).

  Raw logits, no temperature: the soft term matches the teachers' logit scale, the CE term keeps the
  student on the image's original class.
  """
  student_logits, teacher_logits = _as_f32(student_logits, teacher_logits)
  mse = jnp.mean(jnp.square(student_logits - teacher_logits))
  return mse + gamma * hard_ce(student_logits, labels)


def kl_soft(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float) -> jax.Array:
  """KLDivLoss(reduction='batchmean')(log_softmax(z_s / T), softmax(z_t / T)), without a T^2 factor.

  Sum over classes of p_t (log p_t - log p_s), divided by the batch size (SRe2L).
  """
  student_logits, teacher_logits = _as_f32(student_logits, teacher_logits)
  log_p_student = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  log_p_teacher = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(log_p_teacher) * (log_p_teacher - log_p_student))
  return kl / student_logits.shape[0]


def hard_ce(student_logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean cross-entropy with the hard labels (each view keeps its source image's class)."""
  (student_logits,) = _as_f32(student_logits)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(student_logits, jnp.asarray(labels)))


def student_loss(name: str, student_logits: jax.Array, teacher_logits: jax.Array | None, labels: jax.Array,
                 *, gamma: float, temperature: float) -> jax.Array:
  """The loss `name` (`train.loss`): `mse_gt` uses gamma and labels, `kl` uses temperature, `ce` only
  the labels (`teacher_logits` may be None)."""
  if name == "ce":
    return hard_ce(student_logits, labels)
  if teacher_logits is None:
    raise errors.ConfigError(f"train.loss={name!r} needs teacher logits")
  if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
    raise ValueError(f"student logits {student_logits.shape} and teacher logits {teacher_logits.shape}: "
                     "expected the same (batch, classes) shape")
  if name == "mse_gt":
    return mse_gt(student_logits, teacher_logits, labels, gamma)
  if name == "kl":
    return kl_soft(student_logits, teacher_logits, temperature)
  raise errors.ConfigError(f"train.loss={name!r}: expected one of {LOSSES}")
