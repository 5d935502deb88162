"""The recovery program: a wave of recovery batches ("units") optimized side by side (SPEC 4.3, 4.5).

A wave holds W units stacked on a leading axis that is sharded over the mesh's data axis; teacher
variables are replicated. The program is a `jax.shard_map`: every device runs its own units one
after another (`lax.map`), each for its own number of iterations, so there is no cross-device
communication and results do not depend on how units are laid out on devices.

Per unit and iteration, each teacher sits behind a `lax.cond` on "does this unit use this teacher
at this iteration": a teacher is never evaluated for a unit that does not use it (also when
`strategy='intra'` re-draws teachers every iteration), padding units and finished units cost
nothing, and units with different teacher sets can share a wave. The conds also bound memory: the
gradient of the sum over teachers is accumulated one teacher at a time (teacher k+1's branch takes
teacher k's accumulated gradient as input), so only one teacher's activations are live at once.
The augmentation's pullback is applied once to the summed gradient. `sequential_teachers=False`
switches to the naive form (one gradient of the summed loss, every teacher always evaluated),
kept as the baseline for the memory benchmark. With `remat` (default) each teacher keeps only its
top-level block outputs for the backward pass and recomputes the inside of a block when needed,
so the live set is one block's activations plus the block boundaries.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from prism_jax.data import augment as aug
from prism_jax.models import bn_stats
from prism_jax.recover import objective


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static settings of a compiled wave program (hashable: used as a jit static argument)."""
  teacher_names: tuple[str, ...]     # evaluation order; the logit teacher first
  image_size: int
  low: tuple[float, float, float]    # per-channel clip bounds in normalized space
  high: tuple[float, float, float]
  learning_rate: float
  first_bn_multiplier: float
  jitter: int
  rrc_scale: tuple[float, float] = (0.08, 1.0)
  flip: bool = True
  adam_b1: float = 0.5
  adam_b2: float = 0.9
  adam_eps: float = 1e-8
  tv_weight: float = 0.0
  l2_weight: float = 0.0
  sequential_teachers: bool = True   # per-teacher conds (skip unused, one teacher live at a time)
  remat: bool = True                 # keep only block outputs for the backward pass, recompute the rest




BLOCK_OUTPUT = "teacher_block_output"


def _tag_block_outputs(next_fun, args, kwargs, context):
  """Names the outputs of a model's top-level blocks so remat can keep exactly those."""
  out = next_fun(*args, **kwargs)
  if context.method_name == "__call__" and len(context.module.scope.path) == 1:
    out = jax.tree_util.tree_map(
        lambda x: checkpoint_name(x, BLOCK_OUTPUT) if isinstance(x, jax.Array) else x, out)
  return out


def init_state(images: jax.Array) -> dict[str, jax.Array]:
  """Optimizer state for a wave of images shaped (W, C, H, W, 3)."""
  num_units = images.shape[0]
  # Distinct buffers: the state is donated, and one buffer may not be donated twice.
  return {"images": images, "adam_m": jnp.zeros_like(images), "adam_v": jnp.zeros_like(images),
          "last_ce": jnp.zeros((num_units,), jnp.float32),
          "last_bn": jnp.zeros((num_units,), jnp.float32),
          "nonfinite_at": jnp.full((num_units,), -1, jnp.int32)}


def unit_loss_grad(images, labels, aug_key, ce_weights, bn_weights, teachers, cfg: StepConfig):
  """Gradient w.r.t. the images of one unit, plus its CE and BN losses at this iteration.

  ce_weights[k] is 1 for the logit teacher (0 otherwise); bn_weights[k] = r_bn / K for the BN
  teachers drawn (0 otherwise). `teachers` is a tuple of (model, variables) in cfg order.
  """
  params = aug.sample_recover_aug_params(aug_key, (cfg.image_size, cfg.image_size), cfg.jitter,
                                         scale=cfg.rrc_scale, flip=cfg.flip)
  augmented, pullback = jax.vjp(lambda x: aug.apply_recover_aug(x, params), images)

  def teacher_loss(x, k):
    model, variables = teachers[k]
    with nn.intercept_methods(_tag_block_outputs):
      out = bn_stats.forward_with_bn_stats(model, variables, x)
    ce = ce_weights[k] * objective.cross_entropy(out.logits, labels)
    bn = bn_weights[k] * objective.bn_matching_loss(out.bn, cfg.first_bn_multiplier)
    return ce + bn, (ce, bn)

  if cfg.remat:
    teacher_loss = jax.checkpoint(teacher_loss, static_argnums=(1,),
                                  policy=jax.checkpoint_policies.save_only_these_names(BLOCK_OUTPUT))

  zero = jnp.zeros((), jnp.float32)
  if cfg.sequential_teachers:
    carry = (jnp.zeros_like(augmented), zero, zero)
    for k in range(len(teachers)):
      def run_teacher(carry, k=k):
        grad, ce_total, bn_total = carry
        (_, (ce, bn)), g = jax.value_and_grad(teacher_loss, has_aux=True)(augmented, k)
        return grad + g, ce_total + ce, bn_total + bn
      used = (ce_weights[k] > 0) | (bn_weights[k] > 0)
      carry = jax.lax.cond(used, run_teacher, lambda carry: carry, carry)
    grad, ce_total, bn_total = carry
  else:
    def joint_loss(x):
      terms = [teacher_loss(x, k)[1] for k in range(len(teachers))]
      ce_total = sum(t[0] for t in terms)
      bn_total = sum(t[1] for t in terms)
      return ce_total + bn_total, (ce_total, bn_total)
    (_, (ce_total, bn_total)), grad = jax.value_and_grad(joint_loss, has_aux=True)(augmented)
  (image_grad,) = pullback(grad)
  if cfg.tv_weight or cfg.l2_weight:
    def prior_fn(x):
      return cfg.tv_weight * objective.total_variation(x) + cfg.l2_weight * jnp.sqrt(jnp.sum(x * x))
    prior, prior_grad = jax.value_and_grad(prior_fn)(images)
    image_grad = image_grad + prior_grad
    bn_total = bn_total + prior
  return image_grad, ce_total, bn_total


def adam_update(images, m, v, grad, t, total, cfg: StepConfig):
  """torch.optim.Adam step with lr_t = lr0 * 0.5 * (1 + cos(pi t / T)), then clip."""
  lr = cfg.learning_rate * 0.5 * (1.0 + jnp.cos(jnp.pi * t / total))
  m = cfg.adam_b1 * m + (1.0 - cfg.adam_b1) * grad
  v = cfg.adam_b2 * v + (1.0 - cfg.adam_b2) * jnp.square(grad)
  step = (t + 1).astype(jnp.float32)
  m_hat = m / (1.0 - cfg.adam_b1 ** step)
  denom = jnp.sqrt(v) / jnp.sqrt(1.0 - cfg.adam_b2 ** step) + cfg.adam_eps
  images = images - lr * m_hat / denom
  low = jnp.asarray(cfg.low, jnp.float32)
  high = jnp.asarray(cfg.high, jnp.float32)
  return jnp.clip(images, low, high), m, v


def run_iterations(state, unit_keys, labels, totals, ce_weights, bn_weights, teacher_variables,
                   start, stop, *, models: tuple, cfg: StepConfig, mesh):
  """Runs iterations [start, min(stop, T_u)) of every unit u of a wave.

  Shapes (W = units in the wave, a multiple of the mesh size): state arrays (W, C, H, W, 3) / (W,);
  unit_keys (W, 2) uint32 key data; labels (W, C); totals (W,) iteration counts T_u (0 for padding
  units); ce_weights, bn_weights (W, T_max, n_teachers) per-iteration teacher weights.
  """
  teachers_static = tuple(models)
  wave = P(mesh.axis_names[0])

  def local(state, unit_keys, labels, totals, ce_weights, bn_weights, teacher_variables, start, stop):
    teachers = tuple(zip(teachers_static, teacher_variables))

    def one_unit(unit):
      st, key_data, unit_labels, total, ce_w, bn_w = unit
      key = jax.random.wrap_key_data(key_data)

      def body(t, st):
        grad, ce, bn = unit_loss_grad(st["images"], unit_labels, jax.random.fold_in(key, t), ce_w[t],
                                      bn_w[t], teachers, cfg)
        images, m, v = adam_update(st["images"], st["adam_m"], st["adam_v"], grad, t, total, cfg)
        finite = jnp.isfinite(ce) & jnp.isfinite(bn) & jnp.all(jnp.isfinite(grad))
        ok = finite & (st["nonfinite_at"] < 0)
        pick = lambda new, old: jnp.where(ok, new, old)
        return {"images": pick(images, st["images"]), "adam_m": pick(m, st["adam_m"]),
                "adam_v": pick(v, st["adam_v"]), "last_ce": pick(ce, st["last_ce"]),
                "last_bn": pick(bn, st["last_bn"]),
                "nonfinite_at": jnp.where(~finite & (st["nonfinite_at"] < 0), t, st["nonfinite_at"])}

      end = jnp.maximum(start, jnp.minimum(stop, total))
      return jax.lax.fori_loop(start, end, body, st)

    return jax.lax.map(one_unit, (state, unit_keys, labels, totals, ce_weights, bn_weights))

  return jax.shard_map(local, mesh=mesh, in_specs=(wave,) * 6 + (P(), P(), P()), out_specs=wave,
                       check_vma=False)(state, unit_keys, labels, totals, ce_weights, bn_weights,
                                        teacher_variables, start, stop)
