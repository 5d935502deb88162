"""Student LR schedules, distillation losses and teacher-logit aggregation, checked against hand values
and against PyTorch (the official implementations' framework)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prism_jax.relabel import aggregate
from prism_jax.train import losses, schedules


# ---------------------------------------------------------------------------------------------- schedules

@pytest.mark.parametrize("epoch, expected", [
    (0, 1.0),
    (100, 0.9567727288213004),   # 1/2 (1 + cos(pi 100 / 750)) = 1/2 (1 + cos 24 deg)
    (249, 0.7518116008178805),   # 1/2 (1 + cos(pi 249 / 750))
    (250, 0.75),                 # still the cosine at e = 5E/6 (inclusive switch): 1/2 (1 + cos(pi/3))
    (251, 0.1225),               # the drop: 1/2 (1 + cos(5 pi / 15)) * (1 - 251/300) = 0.75 * 49/300
    (299, 0.0025),               # 0.75 * 1/300
])
def test_prism_cos2_pinned_values(epoch, expected):
  assert schedules.lr_factor("prism_cos2", epoch, 300) == pytest.approx(expected, rel=1e-12)
  traced = jax.jit(lambda e: schedules.lr_factor("prism_cos2", e, 300, 2.5))(jnp.int32(epoch))
  assert float(traced) == pytest.approx(expected, rel=1e-6)


def test_simple_schedule_values():
  assert schedules.lr_factor("constant", 123, 300) == 1.0
  assert schedules.lr_factor("cosine", 0, 300) == pytest.approx(1.0)
  assert schedules.lr_factor("cosine", 150, 300) == pytest.approx(0.5)
  assert schedules.lr_factor("cosine", 300, 300) == pytest.approx(0.0, abs=1e-15)
  # smoothed cosine, default zeta 2: 1/2 (1 + cos(pi/2)) = 0.5 at e = E, 1/2 (1 + cos(pi/4)) at E/2.
  assert schedules.lr_factor("smoothed_cosine", 300, 300) == pytest.approx(0.5)
  assert schedules.lr_factor("smoothed_cosine", 150, 300) == pytest.approx(0.5 * (1 + math.sqrt(0.5)))
  assert schedules.lr_factor("smoothed_cosine", 300, 300, zeta=1.0) == pytest.approx(0.0, abs=1e-15)
  # An explicit zeta changes prism_cos2 in both branches: zeta 2 -> 1/2 (1 + cos(5 pi / 12)) * (1 - e/E).
  tail = 0.5 * (1 + math.cos(5 * math.pi / 12))
  assert schedules.lr_factor("prism_cos2", 299, 300, zeta=2.0) == pytest.approx(tail / 300)
  for name in schedules.SCHEDULES:
    arr = schedules.lr_factor(name, jnp.arange(300), 300)
    ref = [schedules.lr_factor(name, e, 300) for e in range(300)]
    np.testing.assert_allclose(np.asarray(arr), ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("epochs", [300, 13, 12])
def test_prism_cos2_matches_official_lambdalr(epochs):
  """Drive torch's LambdaLR with the official lambda the way the official loop does (build, then one
  `scheduler.step()` after each epoch) and read the LR each training epoch sees."""
  import torch

  def official(step):  # the formula of validate/train_FKD_parallel.py L288-L290
    if step <= (epochs * 5 / 6):
      return 0.5 * (1. + math.cos(math.pi * step / (2.5 * epochs)))
    return 0.5 * (1. + math.cos(math.pi * 5 / (6 * 2.5))) * (6 * epochs - 6 * step) / (6 * epochs)

  optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
  scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, official, last_epoch=-1)
  seen = []
  for _ in range(epochs):
    seen.append(optimizer.param_groups[0]["lr"])
    optimizer.step()
    scheduler.step()
  ours = [1e-3 * schedules.lr_factor("prism_cos2", e, epochs) for e in range(epochs)]
  np.testing.assert_allclose(ours, seen, rtol=1e-12)
  step_schedule = schedules.make_schedule("prism_cos2", 1e-3, epochs, steps_per_epoch=2)
  per_step = jax.vmap(step_schedule)(jnp.arange(2 * epochs))
  np.testing.assert_allclose(np.asarray(per_step), np.repeat(seen, 2), rtol=1e-5)


def test_make_schedule_is_per_epoch_and_scaled():
  sched = jax.jit(schedules.make_schedule("cosine", 0.1, total_epochs=4, steps_per_epoch=3))
  got = np.array([float(sched(jnp.int32(s))) for s in range(12)])
  expected = 0.1 * np.repeat([1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 - math.cos(math.pi / 4))], 3)
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  # Past the last epoch the epoch is clipped to E: prism_cos2 stays at 0 instead of going negative.
  tail = schedules.make_schedule("prism_cos2", 1.0, total_epochs=6, steps_per_epoch=1)
  assert float(tail(6)) == pytest.approx(0.0, abs=1e-7)
  assert float(tail(50)) == pytest.approx(0.0, abs=1e-7)
  assert float(schedules.make_schedule("constant", 2e-3, 5, 7)(34)) == pytest.approx(2e-3)


def test_make_schedule_warmup():
  # 10 steps per epoch, half an epoch of warm-up = 5 steps rising linearly from 0.
  sched = schedules.make_schedule("cosine", 0.2, total_epochs=4, steps_per_epoch=10, warmup_epochs=0.5)
  got = np.array([float(sched(s)) for s in (0, 1, 2, 5, 9, 10)])
  cos1 = 0.5 * (1 + math.cos(math.pi / 4))
  np.testing.assert_allclose(got, [0.0, 0.04, 0.08, 0.2, 0.2, 0.2 * cos1], rtol=1e-6, atol=1e-9)
  # Warm-up multiplies the per-epoch factor when it spans several epochs.
  long = schedules.make_schedule("cosine", 1.0, total_epochs=4, steps_per_epoch=2, warmup_epochs=2)
  assert float(long(2)) == pytest.approx(0.5 * cos1, rel=1e-6)


def test_schedule_errors_name_the_field():
  with pytest.raises(ValueError, match=r"train\.schedule='linear'.*prism_cos2"):
    schedules.make_schedule("linear", 1e-3, 10, 5)
  with pytest.raises(ValueError, match=r"train\.schedule"):
    schedules.lr_factor("cos", 1, 10)
  with pytest.raises(ValueError, match=r"train\.zeta"):
    schedules.make_schedule("smoothed_cosine", 1e-3, 10, 5, zeta=0.0)
  with pytest.raises(ValueError, match=r"train\.warmup_epochs"):
    schedules.make_schedule("cosine", 1e-3, 10, 5, warmup_epochs=-1)
  with pytest.raises(ValueError, match=r"train\.epochs"):
    schedules.make_schedule("cosine", 1e-3, 0, 5)
  with pytest.raises(ValueError, match=r"steps_per_epoch"):
    schedules.make_schedule("cosine", 1e-3, 10, 0)
  assert schedules.resolve_zeta("prism_cos2", None) == 2.5
  assert schedules.resolve_zeta("smoothed_cosine", None) == 2.0


# ------------------------------------------------------------------------------------------------- losses

def _random_logits(batch=6, classes=5, seed=0):
  rng = np.random.default_rng(seed)
  student = rng.normal(0, 3, (batch, classes)).astype(np.float32)
  teacher = rng.normal(0, 3, (batch, classes)).astype(np.float32)
  labels = rng.integers(0, classes, batch).astype(np.int32)
  return student, teacher, labels


def test_losses_match_torch():
  import torch
  import torch.nn.functional as F
  student, teacher, labels = _random_logits()
  teacher16 = teacher.astype(np.float16)   # stored labels arrive as float16
  ts, tt = torch.from_numpy(student), torch.from_numpy(teacher16).float()
  expected_mse = (torch.nn.MSELoss()(ts, tt) + 0.1 * F.cross_entropy(ts, torch.from_numpy(labels).long())).item()
  got = losses.student_loss("mse_gt", jnp.asarray(student), jnp.asarray(teacher16), jnp.asarray(labels),
                            gamma=0.1, temperature=20.0)
  assert got.dtype == jnp.float32
  assert float(got) == pytest.approx(expected_mse, rel=1e-5)
  for temperature in (1.0, 4.0, 20.0):
    expected_kl = torch.nn.KLDivLoss(reduction="batchmean")(
        F.log_softmax(ts / temperature, dim=1), F.softmax(tt / temperature, dim=1)).item()
    got = losses.student_loss("kl", jnp.asarray(student), jnp.asarray(teacher16), jnp.asarray(labels),
                              gamma=0.1, temperature=temperature)
    assert float(got) == pytest.approx(expected_kl, rel=1e-4, abs=1e-7)


def test_losses_hand_cases():
  student, _, labels = _random_logits(seed=1)
  z = jnp.asarray(student)
  assert float(losses.kl_soft(z, z, 20.0)) == pytest.approx(0.0, abs=1e-7)
  assert float(losses.mse_gt(z, z, labels, 0.0)) == 0.0
  # One sample, two classes: z_s = (0, 0), z_t = (2, 0), label 0 -> MSE = (4 + 0) / 2, CE = log 2.
  zs, zt = jnp.zeros((1, 2)), jnp.array([[2.0, 0.0]])
  assert float(losses.mse_gt(zs, zt, jnp.array([0]), 0.5)) == pytest.approx(2.0 + 0.5 * math.log(2), rel=1e-6)
  # KL(p_t || uniform) with p_t = softmax(2, 0) at T = 1, divided by the batch size 1.
  p = np.array([math.exp(2), 1.0]) / (math.exp(2) + 1)
  assert float(losses.kl_soft(zs, zt, 1.0)) == pytest.approx(float(np.sum(p * np.log(p / 0.5))), rel=1e-5)
  # ce reads no teacher: z_s = (0, 0) -> log 2 for either label; z_s = (log 3, 0), label 0 -> log(4/3).
  assert float(losses.student_loss("ce", zs, None, jnp.array([1]), gamma=0.5, temperature=1.0)) == pytest.approx(
      math.log(2), rel=1e-6)
  two = jnp.array([[math.log(3), 0.0], [0.0, 0.0]])
  assert float(losses.hard_ce(two, jnp.array([0, 1]))) == pytest.approx((math.log(4 / 3) + math.log(2)) / 2, rel=1e-6)
  # batchmean: duplicating the batch leaves the value unchanged.
  assert float(losses.kl_soft(jnp.tile(zs, (3, 1)), jnp.tile(zt, (3, 1)), 1.0)) == pytest.approx(
      float(losses.kl_soft(zs, zt, 1.0)), rel=1e-6)


def test_loss_errors():
  z = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match=r"train\.loss='dist'.*mse_gt"):
    losses.student_loss("dist", z, z, jnp.zeros(2, jnp.int32), gamma=0.1, temperature=1.0)
  with pytest.raises(ValueError, match=r"train\.loss='kl' needs teacher logits"):
    losses.student_loss("kl", z, None, jnp.zeros(2, jnp.int32), gamma=0.1, temperature=1.0)
  with pytest.raises(ValueError, match="same"):
    losses.student_loss("kl", z, jnp.zeros((2, 4)), jnp.zeros(2, jnp.int32), gamma=0.1, temperature=1.0)


# ---------------------------------------------------------------------------------------------- aggregation

def test_norm_rescaled_mean_hand_examples():
  a = jnp.array([[3.0, 0.0], [0.0, 4.0]])         # ||A||_F = 5
  # Same direction, norms 5 and 10: both rescale to the mean norm 7.5 -> 1.5 A.
  np.testing.assert_allclose(aggregate.aggregate_logits(jnp.stack([a, 2 * a]), "norm_rescaled_mean"),
                             1.5 * a, rtol=1e-6)
  # Different directions, B with ||B||_F = 5, teachers A and 2B: 0.75 (A + B), unlike the plain mean.
  b = jnp.array([[0.0, 5.0], [0.0, 0.0]])
  stacked = jnp.stack([a, 2 * b])
  np.testing.assert_allclose(aggregate.aggregate_logits(stacked, "norm_rescaled_mean"),
                             [[2.25, 3.75], [0.0, 3.0]], rtol=1e-6)
  np.testing.assert_allclose(aggregate.aggregate_logits(stacked, "mean"), [[1.5, 5.0], [0.0, 2.0]])
  np.testing.assert_array_equal(aggregate.aggregate_logits(stacked, "single"), a)
  # One teacher: every method returns it unchanged (primary_weighted still rescales each row to the
  # batch's mean row norm, as the official r50 script does; tests/test_relabel_train.py checks that).
  for method in set(aggregate.AGGREGATIONS) - {"primary_weighted"}:
    np.testing.assert_allclose(aggregate.aggregate_logits(a[None], method), a, rtol=1e-6)


def test_norm_rescaled_mean_matches_official_torch_lines():
  import torch
  logits = np.random.default_rng(3).normal(0, 1, (4, 8, 10)).astype(np.float32)
  logits *= np.array([1.0, 3.0, 0.5, 7.0], np.float32)[:, None, None]
  output = torch.from_numpy(logits)
  norm = torch.norm(output, dim=[1, 2], keepdim=True)
  expected = (output / norm * norm.mean(0, keepdim=True)).mean(0).numpy()
  got = aggregate.aggregate_logits(jnp.asarray(logits, jnp.float16), "norm_rescaled_mean")
  assert got.shape == (8, 10) and got.dtype == jnp.float32
  np.testing.assert_allclose(jax.jit(aggregate.aggregate_logits, static_argnums=1)(jnp.asarray(logits),
                                                                                   "norm_rescaled_mean"),
                             expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-3)


def test_aggregation_errors():
  with pytest.raises(ValueError, match=r"relabel\.aggregation='median'.*norm_rescaled_mean"):
    aggregate.aggregate_logits(jnp.zeros((2, 3, 4)), "median")
  with pytest.raises(ValueError, match=r"\(teachers >= 1, batch, classes\)"):
    aggregate.aggregate_logits(jnp.zeros((3, 4)), "mean")
