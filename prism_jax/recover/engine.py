"""The recovery program: a wave of recovery batches ("units") optimized side by side (SPEC 4.3, 4.5).

A wave holds W units stacked on a leading axis that is sharded over the mesh's data axis; teacher
variables are replicated. The program is a `jax.shard_map` whose body is a `jax.vmap` over the
device's own units (`units_per_device` of them), so there is no cross-device communication and a
unit's images do not depend on how units are laid out on devices. Each unit keeps its own
iteration count T_u: a unit past its T_u (or a padding unit, T_u = 0) is frozen.

Per iteration, each teacher sits behind a `lax.cond` on "does any unit on this device use this
teacher at this iteration": a teacher is never evaluated on a device none of whose units uses it
(also when `strategy='intra'` re-draws teachers every iteration), and the wave scheduler groups
units with the same teachers and similar T on the same device so that what a device runs is what
its units need (the useful-work fraction measures the rest). The conds also bound memory: the
gradient of the sum over teachers is accumulated one teacher at a time (teacher k+1's branch takes
teacher k's accumulated gradient as input), so only one teacher's activations are live at once,
and the logit teacher's logits and BN statistics come from one shared forward pass. The
augmentation's pullback is applied once to the summed gradient. `sequential_teachers=False`
switches to the naive form (one gradient of the summed loss, every teacher always evaluated),
kept as the baseline for the memory benchmark. With `remat` (default) each teacher keeps only its
top-level block outputs for the backward pass and recomputes the inside of a block when needed.

On CPU (`recover.teacher_gating='static'`, the default there) the host drives the iterations and
an iteration is a short sequence of programs with no loop and no conditional, because XLA:CPU runs
convolutions nested in a loop or a conditional about 3.5x slower: one program prepares the
iteration, one per teacher any unit of the wave uses at that iteration adds that teacher's terms,
and one applies the pullback and the Adam step (`static_iteration`). The arithmetic is the one
above in the same order, and there is one program per teacher rather than one per teacher set.
Images are the same either way (a teacher a unit does not use contributes exactly 0).

`teacher_pieces[k] = c > 1` splits a recovery batch into c pieces for teacher k and still takes
the exact gradient of the whole-batch objective: a forward pass over the pieces sums each BN
layer's moments (`bn_stats.forward_with_bn_moments`), the loss is differentiated w.r.t. those
moments, and one vjp per piece pulls that back to the piece's images. Teacher k's live
activations shrink c-fold for one extra forward pass; this is how a memory-hungry BN teacher
(EfficientNet-B0 at 224 px) stays within the footprint of the logit teacher.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from prism_jax.data import augment as aug
from prism_jax.io import exported
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
  teacher_pieces: tuple[int, ...] = ()  # pieces per recovery batch for each teacher (default 1)

  def pieces(self, k: int) -> int:
    return self.teacher_pieces[k] if k < len(self.teacher_pieces) else 1


BLOCK_OUTPUT = "teacher_block_output"


def _tag_block_outputs(next_fun, args, kwargs, context):
  """Names the outputs of a model's top-level blocks so remat can keep exactly those."""
  out = next_fun(*args, **kwargs)
  if context.method_name == "__call__" and len(context.module.scope.path) == 1:
    out = jax.tree_util.tree_map(
        lambda x: checkpoint_name(x, BLOCK_OUTPUT) if isinstance(x, jax.Array) else x, out)
  return out


def _maybe_remat(fn, cfg: StepConfig):
  if not cfg.remat:
    return fn
  return jax.checkpoint(fn, policy=jax.checkpoint_policies.save_only_these_names(BLOCK_OUTPUT))


def init_state(images: jax.Array) -> dict[str, jax.Array]:
  """Optimizer state for a wave of images shaped (W, C, H, W, 3)."""
  num_units = images.shape[0]
  # Distinct buffers: the state is donated, and one buffer may not be donated twice.
  return {"images": images, "adam_m": jnp.zeros_like(images), "adam_v": jnp.zeros_like(images),
          "last_ce": jnp.zeros((num_units,), jnp.float32),
          "last_bn": jnp.zeros((num_units,), jnp.float32),
          "nonfinite_at": jnp.full((num_units,), -1, jnp.int32)}


def teacher_loss_grad(x, labels, ce_weight, bn_weight, model, variables, cfg: StepConfig, pieces: int = 1):
  """One teacher's weighted loss terms on one recovery batch `x` (C, H, W, 3), and their gradient.

  Returns (grad, ce, bn) with ce = ce_weight * CE(logits, labels) and bn = bn_weight * BN loss.
  With pieces > 1 the batch is processed in that many pieces, with the exact whole-batch gradient.
  """
  if pieces <= 1:
    def loss(x):
      with nn.intercept_methods(_tag_block_outputs):
        out = bn_stats.forward_with_bn_stats(model, variables, x)
      ce = ce_weight * objective.cross_entropy(out.logits, labels)
      bn = bn_weight * objective.bn_matching_loss(out.bn, cfg.first_bn_multiplier)
      return ce + bn, (ce, bn)
    (_, (ce, bn)), grad = jax.value_and_grad(_maybe_remat(loss, cfg), has_aux=True)(x)
    return grad, ce, bn

  # The batch as `pieces` equal pieces (zero-weight padding rows fill the last one), run by
  # `lax.map`: a loop body's buffers are reused from one piece to the next, so only one piece's
  # activations are ever live (unrolled pieces would let XLA schedule them side by side).
  rows = x.shape[0]
  size = -(-rows // pieces)
  pad = size * pieces - rows
  split = lambda a: jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape((pieces, size) + a.shape[1:])
  xs, ys = split(x), split(labels)
  ws = split(jnp.ones((rows,), jnp.float32))

  # Pass 1: whole-batch BN moments, summed over pieces (no activations kept).
  def piece_moments(args):
    xp, wp = args
    return bn_stats.forward_with_bn_moments(model, variables, xp, rows, row_weights=wp)[1]
  stacked = jax.lax.map(piece_moments, (xs, ws))   # every field gets a leading pieces axis
  running = [(m.running_mean[0], m.running_var[0]) for m in stacked]
  means = tuple(jnp.sum(m.mean_part, axis=0) for m in stacked)
  variances = tuple(jnp.sum(m.sq_part, axis=0) - jnp.square(mu - rm)
                    for m, mu, (rm, _) in zip(stacked, means, running))

  def bn_of_moments(means, variances):
    stats = [bn_stats.BNStat(mu, var, rm, rv) for mu, var, (rm, rv) in zip(means, variances, running)]
    return objective.bn_matching_loss(stats, cfg.first_bn_multiplier)

  bn_loss, (d_means, d_vars) = jax.value_and_grad(bn_of_moments, argnums=(0, 1))(means, variances)

  # Pass 2: per piece, the vjp of (its CE share, its moment shares centered at the batch means).
  def piece_terms(xp, yp, wp):
    with nn.intercept_methods(_tag_block_outputs):
      logits, part = bn_stats.forward_with_bn_moments(model, variables, xp, rows, centers=means,
                                                      row_weights=wp)
    per_row = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), yp)
    return jnp.sum(wp * per_row) / rows, tuple(p.mean_part for p in part), tuple(p.sq_part for p in part)

  piece_terms = _maybe_remat(piece_terms, cfg)
  cotangent = (ce_weight, tuple(bn_weight * d for d in d_means), tuple(bn_weight * d for d in d_vars))

  def piece_grad(args):
    xp, yp, wp = args
    (ce_part, _, _), pullback = jax.vjp(lambda xp: piece_terms(xp, yp, wp), xp)
    return pullback(cotangent)[0], ce_part
  grads, ce_parts = jax.lax.map(piece_grad, (xs, ys, ws))
  grad = grads.reshape((size * pieces,) + x.shape[1:])[:rows]
  return grad, ce_weight * jnp.sum(ce_parts), bn_weight * bn_loss


def _augment(images, aug_keys, cfg: StepConfig):
  """The recovery augmentation of a device's units (one draw per unit) and its linear pullback."""
  def sample(key):
    return aug.sample_recover_aug_params(key, (cfg.image_size, cfg.image_size), cfg.jitter,
                                         scale=cfg.rrc_scale, flip=cfg.flip)
  params = jax.vmap(sample)(aug_keys)
  return jax.vjp(lambda x: jax.vmap(aug.apply_recover_aug)(x, params), images)


def _teacher_contribution(augmented, labels, ce_weights, bn_weights, model, variables, cfg: StepConfig,
                          pieces: int):
  """One teacher's (grad, ce, bn) for each of a device's units; ce_weights, bn_weights (L,) are its
  weights. A unit that does not use the teacher gets exactly nothing from it (not 0 * a non-finite
  value)."""
  fn = lambda x, y, cw, bw: teacher_loss_grad(x, y, cw, bw, model, variables, cfg, pieces)
  grad, ce, bn = jax.vmap(fn)(augmented, labels, ce_weights, bn_weights)
  used = (ce_weights > 0) | (bn_weights > 0)
  return (jnp.where(used[:, None, None, None, None], grad, 0.0), jnp.where(used, ce, 0.0),
          jnp.where(used, bn, 0.0))


def _with_image_prior(images, image_grad, bn_total, unit_used, cfg: StepConfig):
  """Adds the TV / L2 image prior (when configured) of every unit that uses any teacher."""
  if not (cfg.tv_weight or cfg.l2_weight):
    return image_grad, bn_total
  def prior_fn(x):
    return cfg.tv_weight * objective.total_variation(x) + cfg.l2_weight * jnp.sqrt(jnp.sum(x * x))
  prior, prior_grad = jax.vmap(jax.value_and_grad(prior_fn))(images)
  active = jnp.any(unit_used, axis=1)
  image_grad = image_grad + jnp.where(active[:, None, None, None, None], prior_grad, 0.0)
  return image_grad, bn_total + jnp.where(active, prior, 0.0)


def group_loss_grad(images, labels, aug_keys, ce_weights, bn_weights, teachers, cfg: StepConfig):
  """Gradients w.r.t. the images of a device's units, plus each unit's CE and BN loss.

  images (L, C, H, W, 3); labels (L, C); aug_keys (L,) keys; ce_weights, bn_weights (L, n): the
  teachers' weights at this iteration (ce 1 for the unit's logit teacher, bn r_bn / K for its BN
  teachers, all 0 for a frozen unit). `teachers` is a tuple of (model, variables) in cfg order.
  This is the one-program form (teachers behind conditionals, or the naive joint gradient); static
  gating runs the same terms as separate programs (`static_iteration`).
  """
  augmented, pullback = _augment(images, aug_keys, cfg)
  zero = jnp.zeros((images.shape[0],), jnp.float32)
  unit_used = (ce_weights > 0) | (bn_weights > 0)                     # (L, n)
  if cfg.sequential_teachers:
    carry = (jnp.zeros_like(augmented), zero, zero)
    for k, (model, variables) in enumerate(teachers):
      def run_teacher(carry, k=k, model=model, variables=variables):
        grad, ce, bn = _teacher_contribution(augmented, labels, ce_weights[:, k], bn_weights[:, k], model,
                                             variables, cfg, cfg.pieces(k))
        return carry[0] + grad, carry[1] + ce, carry[2] + bn
      carry = jax.lax.cond(jnp.any(unit_used[:, k]), run_teacher, lambda carry: carry, carry)
    grad, ce_total, bn_total = carry
  else:
    def joint_loss(x, y, cw, bw):
      ce_total = bn_total = jnp.zeros((), jnp.float32)
      for k, (model, variables) in enumerate(teachers):
        out = bn_stats.forward_with_bn_stats(model, variables, x)
        ce_total = ce_total + cw[k] * objective.cross_entropy(out.logits, y)
        bn_total = bn_total + bw[k] * objective.bn_matching_loss(out.bn, cfg.first_bn_multiplier)
      return ce_total + bn_total, (ce_total, bn_total)
    grad_fn = jax.value_and_grad(joint_loss, has_aux=True)
    (_, (ce_total, bn_total)), grad = jax.vmap(grad_fn)(augmented, labels, ce_weights, bn_weights)
  (image_grad,) = pullback(grad)
  image_grad, bn_total = _with_image_prior(images, image_grad, bn_total, unit_used, cfg)
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


def _iteration_inputs(t, keys, totals, ce_weights, bn_weights):
  """(live, ce_t, bn_t, step_keys) of iteration t: units with t >= T_u get all-zero weights."""
  live = t < totals                                                     # (L,)
  ce_t = jnp.where(live[:, None], jax.lax.dynamic_index_in_dim(ce_weights, t, 1, False), 0.0)
  bn_t = jnp.where(live[:, None], jax.lax.dynamic_index_in_dim(bn_weights, t, 1, False), 0.0)
  return live, ce_t, bn_t, _step_keys(keys, t)


def _step_keys(keys, t):
  """Each unit's augmentation key at iteration t."""
  return jax.vmap(lambda key: jax.random.fold_in(key, t))(keys)


def _apply_update(st, t, totals, live, grad, ce, bn, cfg: StepConfig):
  """The Adam step of every live unit whose loss is finite; a non-finite loss freezes the unit and
  records the iteration."""
  update = jax.vmap(adam_update, in_axes=(0, 0, 0, 0, None, 0, None))
  images, m, v = update(st["images"], st["adam_m"], st["adam_v"], grad, t,
                        jnp.maximum(totals, 1), cfg)
  finite = jnp.isfinite(ce) & jnp.isfinite(bn) & jnp.all(jnp.isfinite(grad), axis=(1, 2, 3, 4))
  ok = live & finite & (st["nonfinite_at"] < 0)
  pick = lambda new, old: jnp.where(ok.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
  return {"images": pick(images, st["images"]), "adam_m": pick(m, st["adam_m"]),
          "adam_v": pick(v, st["adam_v"]), "last_ce": pick(ce, st["last_ce"]),
          "last_bn": pick(bn, st["last_bn"]),
          "nonfinite_at": jnp.where(live & ~finite & (st["nonfinite_at"] < 0), t, st["nonfinite_at"])}


def iteration(st, t, keys, labels, totals, ce_weights, bn_weights, teachers, cfg: StepConfig):
  """One iteration t of a device's units (L of them); units with t >= T_u are left unchanged."""
  live, ce_t, bn_t, step_keys = _iteration_inputs(t, keys, totals, ce_weights, bn_weights)
  grad, ce, bn = group_loss_grad(st["images"], labels, step_keys, ce_t, bn_t, teachers, cfg)
  return _apply_update(st, t, totals, live, grad, ce, bn, cfg)


def _wave_map(fn, mesh, n_in: int, n_replicated: int = 0, n_scalar: int = 0):
  """`fn` as a shard_map over the wave axis: n_in wave-sharded inputs, then replicated ones and
  scalars; wave-sharded outputs."""
  wave = P(mesh.axis_names[0])
  return jax.shard_map(fn, mesh=mesh, in_specs=(wave,) * n_in + (P(),) * (n_replicated + n_scalar),
                       out_specs=wave, check_vma=False)


def run_iterations(state, unit_keys, labels, totals, ce_weights, bn_weights, teacher_variables,
                   start, stop, *, models: tuple, cfg: StepConfig, mesh):
  """Runs iterations [start, min(stop, T_u)) of every unit u of a wave in one program (`cond` gating).

  Shapes (W = units in the wave, a multiple of the mesh size): state arrays (W, C, H, W, 3) / (W,);
  unit_keys (W, 2) uint32 key data; labels (W, C); totals (W,) iteration counts T_u (0 for padding
  units); ce_weights, bn_weights (W, T_max, n_teachers) per-iteration teacher weights. The
  iterations run in a `fori_loop` with every teacher behind a `lax.cond` (accelerators); the CPU
  path is `static_iteration`.
  """
  teachers_static = tuple(models)

  def local(state, unit_keys, labels, totals, ce_weights, bn_weights, teacher_variables, start, stop):
    teachers = tuple(zip(teachers_static, teacher_variables))
    keys = jax.vmap(jax.random.wrap_key_data)(unit_keys)

    def body(t, st):
      return iteration(st, t, keys, labels, totals, ce_weights, bn_weights, teachers, cfg)

    end = jnp.maximum(start, jnp.minimum(stop, jnp.max(totals)))
    return jax.lax.fori_loop(start, end, body, state)

  return _wave_map(local, mesh, 6, n_replicated=1, n_scalar=2)(state, unit_keys, labels, totals, ce_weights,
                                                               bn_weights, teacher_variables, start, stop)


# Static gating (the CPU path): one iteration is a sequence of small programs driven by the host,
# none with a loop or a conditional (XLA:CPU runs convolutions inside a loop body or a conditional
# branch about 3.5x slower than at the top level of a program):
#   begin        the iteration's teacher weights, the augmented images, zero accumulators;
#   teacher k    for each teacher any unit of the wave uses at this iteration (in cfg order): adds
#                its (grad, ce, bn) to the accumulators;
#   end          the augmentation's pullback of the summed gradient, the image prior, Adam.
# That is the arithmetic of one iteration of `run_iterations`, in the same order, so the images are
# the same; but the programs are one per teacher (plus two) and per wave width, where one program per
# iteration would need one per distinct teacher set drawn (up to 2^n - 1, each re-tracing and
# re-compiling every teacher it holds).


def _static_begin(images, unit_keys, totals, ce_weights, bn_weights, t, *, cfg: StepConfig, mesh):
  def local(images, unit_keys, totals, ce_weights, bn_weights, t):
    keys = jax.vmap(jax.random.wrap_key_data)(unit_keys)
    _, ce_t, bn_t, step_keys = _iteration_inputs(t, keys, totals, ce_weights, bn_weights)
    augmented, _ = _augment(images, step_keys, cfg)
    zero = jnp.zeros((images.shape[0],), jnp.float32)
    return augmented, ce_t, bn_t, (jnp.zeros_like(augmented), zero, jnp.zeros_like(zero))
  return _wave_map(local, mesh, 5, n_scalar=1)(images, unit_keys, totals, ce_weights, bn_weights, t)


def _static_teacher(acc, augmented, labels, ce_t, bn_t, variables, *, k: int, model, cfg: StepConfig, mesh):
  def local(acc, augmented, labels, ce_t, bn_t, variables):
    grad, ce, bn = _teacher_contribution(augmented, labels, ce_t[:, k], bn_t[:, k], model, variables, cfg,
                                         cfg.pieces(k))
    return acc[0] + grad, acc[1] + ce, acc[2] + bn
  return _wave_map(local, mesh, 5, n_replicated=1)(acc, augmented, labels, ce_t, bn_t, variables)


def _static_end(state, acc, unit_keys, totals, ce_t, bn_t, t, *, cfg: StepConfig, mesh):
  def local(state, acc, unit_keys, totals, ce_t, bn_t, t):
    keys = jax.vmap(jax.random.wrap_key_data)(unit_keys)
    _, pullback = _augment(state["images"], _step_keys(keys, t), cfg)
    grad, ce, bn = acc
    (image_grad,) = pullback(grad)
    image_grad, bn = _with_image_prior(state["images"], image_grad, bn, (ce_t > 0) | (bn_t > 0), cfg)
    return _apply_update(state, t, totals, t < totals, image_grad, ce, bn, cfg)
  return _wave_map(local, mesh, 6, n_scalar=1)(state, acc, unit_keys, totals, ce_t, bn_t, t)


# Jitted, with their tracing kept beside the persistent compilation cache (io/exported.py): a
# second run in a new work directory neither traces nor compiles them.
_static_begin = exported.Program(_static_begin, static_argnames=("cfg", "mesh"))
_static_teacher = exported.Program(_static_teacher, static_argnames=("k", "model", "cfg", "mesh"),
                                   donate_argnums=(0,))
_static_end = exported.Program(_static_end, static_argnames=("cfg", "mesh"), donate_argnums=(0,))


def static_programs(active: tuple[int, ...]) -> tuple:
  """The programs one static iteration with these teachers runs (keys for the runner's bookkeeping)."""
  return ("begin",) + tuple(("teacher", k) for k in active) + ("end",)


def static_iteration(state, unit_keys, labels, totals, ce_weights, bn_weights, teacher_variables, t, *,
                     models: tuple, cfg: StepConfig, mesh, active: tuple[int, ...]):
  """Iteration t of every unit of a wave (shapes as `run_iterations`), evaluating exactly the
  teachers `active` (those any unit of the wave uses at t: `active_teachers`)."""
  augmented, ce_t, bn_t, acc = _static_begin(state["images"], unit_keys, totals, ce_weights, bn_weights, t,
                                             cfg=cfg, mesh=mesh)
  for k in active:
    acc = _static_teacher(acc, augmented, labels, ce_t, bn_t, teacher_variables[k], k=k, model=models[k],
                          cfg=cfg, mesh=mesh)
  return _static_end(state, acc, unit_keys, totals, ce_t, bn_t, t, cfg=cfg, mesh=mesh)


def static_lowered(state, unit_keys, labels, totals, ce_weights, bn_weights, teacher_variables, t, *,
                   models: tuple, cfg: StepConfig, mesh, active: tuple[int, ...]) -> list:
  """The lowered programs of one `static_iteration` (for cost and memory analysis), in run order."""
  augmented, ce_t, bn_t, acc = _static_begin.eval_shape(state["images"], unit_keys, totals, ce_weights,
                                                        bn_weights, t, cfg=cfg, mesh=mesh)
  out = [_static_begin.lower(state["images"], unit_keys, totals, ce_weights, bn_weights, t, cfg=cfg, mesh=mesh)]
  out += [_static_teacher.lower(acc, augmented, labels, ce_t, bn_t, teacher_variables[k], k=k, model=models[k],
                                cfg=cfg, mesh=mesh) for k in active]
  out.append(_static_end.lower(state, acc, unit_keys, totals, ce_t, bn_t, t, cfg=cfg, mesh=mesh))
  return out


def active_teachers(ce_weights, bn_weights, totals, t: int) -> tuple[int, ...]:
  """Host-side: indices of the teachers any unit of a wave uses at iteration t (numpy inputs)."""
  live = totals > t
  if not live.any():
    return ()
  used = (ce_weights[live, t] > 0) | (bn_weights[live, t] > 0)
  return tuple(int(k) for k in np.flatnonzero(used.any(axis=0)))
