"""Diffusion process: β schedule, q_sample, losses, DDIM (against diffusers), CFG, guidance hook,
per-example sampling keys and the DiT training step (8 simulated CPU devices)."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from prism_jax.diffusion import sampling, schedule as schedule_lib, training
from prism_jax.parallel import mesh as mesh_lib

diffusers = pytest.importorskip("diffusers")

T = 1000
SCHEDULE = schedule_lib.DiffusionSchedule.linear()


def _reference_alphas_cumprod():
  return np.cumprod(1.0 - np.linspace(1e-4, 0.02, T, dtype=np.float64))


def _diffusers_ddim(num_steps):
  scheduler = diffusers.DDIMScheduler(
      num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=False,
      set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon", timestep_spacing="leading")
  scheduler.set_timesteps(num_steps)
  return scheduler


def toy_eps(x, t):
  """A deterministic, nonlinear ε(x, t) that both samplers are driven by."""
  t = jnp.asarray(t, jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
  return 0.9 * jnp.tanh(0.7 * x + 0.3 * jnp.sin(t / 150.0)) + 0.05 * x


def toy_model_fn(x, t, y):
  """A class-conditional toy 'model' with 2C output channels (ε, v), distinct per label."""
  y = y.astype(jnp.float32).reshape(-1, 1, 1, 1)
  eps = toy_eps(x, t) * (1.0 + 0.5 * y) + 0.1 * y
  return jnp.concatenate([eps, jnp.tanh(x - y)], axis=-1)


class ToyDenoiser(nn.Module):
  """Conv ε/v predictor conditioned on a timestep embedding and a label embedding (null = num_classes)."""
  num_classes: int
  out_channels: int
  features: int = 16

  @nn.compact
  def __call__(self, x, t, y):
    freqs = jnp.exp(-jnp.log(1000.0) * jnp.arange(4) / 4)
    angles = t.astype(jnp.float32)[:, None] * freqs[None]
    t_feat = jnp.concatenate([jnp.sin(angles), jnp.cos(angles), t.astype(jnp.float32)[:, None] / T], -1)
    emb = nn.Dense(self.features)(t_feat) + nn.Embed(self.num_classes + 1, self.features)(y)
    h = nn.silu(nn.Conv(self.features, (3, 3))(x) + emb[:, None, None, :])
    h = nn.silu(nn.Conv(self.features, (3, 3))(h) + nn.Dense(self.features)(nn.silu(emb))[:, None, None, :])
    return nn.Conv(self.out_channels, (3, 3))(h)


# ---------------------------------------------------------------------------------------------
# Schedule, q_sample, losses


def test_linear_betas_and_alphas_cumprod_match_diffusers_and_float64():
  ours = schedule_lib.linear_betas()
  assert ours.dtype == np.float64 and ours.shape == (T,)
  assert ours[0] == 1e-4 and ours[-1] == 0.02
  reference = _diffusers_ddim(50)
  np.testing.assert_allclose(np.asarray(SCHEDULE.betas), reference.betas.numpy(), rtol=1e-6, atol=0)
  np.testing.assert_allclose(np.asarray(SCHEDULE.alphas_cumprod), _reference_alphas_cumprod(), rtol=1e-6)
  # diffusers multiplies in float32 (measured drift from the float64 product: 4e-7 relative).
  np.testing.assert_allclose(np.asarray(SCHEDULE.alphas_cumprod), reference.alphas_cumprod.numpy(),
                             rtol=1e-6)
  from_config = schedule_lib.DiffusionSchedule.from_config({"num_timesteps": 10, "beta_end": 0.2})
  np.testing.assert_allclose(np.asarray(from_config.betas), np.linspace(1e-4, 0.2, 10), rtol=1e-6)
  with pytest.raises(ValueError, match="beta_schedule"):
    schedule_lib.DiffusionSchedule.from_config({"beta_schedule": "cosine"})


def test_q_sample_is_the_closed_form():
  rng = np.random.default_rng(0)
  x0 = rng.standard_normal((3, 4, 4, 2)).astype(np.float32)
  noise = rng.standard_normal((3, 4, 4, 2)).astype(np.float32)
  t = np.array([0, 500, 999])
  x_t = np.asarray(schedule_lib.q_sample(SCHEDULE, x0, jnp.asarray(t), noise))
  alpha_bar = _reference_alphas_cumprod()[t][:, None, None, None]
  np.testing.assert_allclose(x_t, np.sqrt(alpha_bar) * x0 + np.sqrt(1 - alpha_bar) * noise, rtol=1e-5,
                             atol=1e-6)
  theirs = _diffusers_ddim(50).add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
  np.testing.assert_allclose(x_t, theirs.numpy(), rtol=1e-5, atol=1e-5)


def test_epsilon_loss_uses_only_the_eps_channels():
  noise = jnp.ones((2, 4, 4, 3))
  out = jnp.concatenate([jnp.zeros((2, 4, 4, 3)).at[1].set(3.0), jnp.full((2, 4, 4, 3), 7.0)], -1)
  np.testing.assert_allclose(schedule_lib.epsilon_loss(out, noise, 3), [1.0, 4.0])
  np.testing.assert_allclose(schedule_lib.epsilon_loss(out[..., :3], noise, 3), [1.0, 4.0])
  with pytest.raises(ValueError, match="in_channels=3"):
    schedule_lib.epsilon_loss(out[..., :4], noise, 3)


def test_vlb_loss_values_and_stop_gradient():
  rng = np.random.default_rng(1)
  x0 = jnp.asarray(rng.uniform(-0.9, 0.9, (3, 4, 4, 2)), jnp.float32)
  noise = jnp.asarray(rng.standard_normal((3, 4, 4, 2)), jnp.float32)
  t = jnp.array([1, 300, 999])
  x_t = schedule_lib.q_sample(SCHEDULE, x0, t, noise)
  vlb_loss = jax.jit(schedule_lib.vlb_loss, static_argnums=5)

  # Exact ε and v = −1 (variance β̃_t): p equals the true posterior, KL = 0.
  exact = jnp.concatenate([noise, -jnp.ones_like(noise)], -1)
  np.testing.assert_allclose(vlb_loss(SCHEDULE, exact, x0, x_t, t, 2), 0.0, atol=2e-4)

  # Exact ε and v = +1 (variance β_t): KL of two Gaussians with the same mean.
  upper = jnp.concatenate([noise, jnp.ones_like(noise)], -1)
  betas, alpha_bar = np.linspace(1e-4, 0.02, T), _reference_alphas_cumprod()
  tn = np.asarray(t)
  beta_tilde = betas[tn] * (1 - alpha_bar[tn - 1]) / (1 - alpha_bar[tn])
  expected = 0.5 * (-1 + np.log(betas[tn]) - np.log(beta_tilde) + beta_tilde / betas[tn]) / np.log(2)
  np.testing.assert_allclose(vlb_loss(SCHEDULE, upper, x0, x_t, t, 2), expected, rtol=2e-3,
                             atol=1e-7)
  assert expected[0] > 0.1  # the bound is informative at small t, where β and β̃ differ most

  # The term trains v only: no gradient reaches the ε channels.
  wrong = jnp.concatenate([noise + 0.3, 0.2 * jnp.ones_like(noise)], -1)
  grad = jax.grad(lambda out: vlb_loss(SCHEDULE, out, x0, x_t, t, 2).sum())(wrong)
  assert float(jnp.abs(grad[..., :2]).max()) == 0.0
  assert float(jnp.abs(grad[..., 2:]).min()) > 0.0

  # t = 0: the discretized decoder NLL (bits) of x_0 under N(x_0, β_0) — the model mean is x_0 exactly.
  t0 = jnp.zeros((1,), jnp.int32)
  x0_edge = jnp.array([0.2, 1.0]).reshape(1, 1, 2, 1)
  noise0 = jnp.zeros_like(x0_edge)
  out0 = jnp.concatenate([noise0, jnp.ones_like(noise0)], -1)  # v = +1: variance β_0
  nll = vlb_loss(SCHEDULE, out0, x0_edge, schedule_lib.q_sample(SCHEDULE, x0_edge, t0, noise0),
                              t0, 1)
  phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))
  half_bin = (1 / 255) / math.sqrt(1e-4)
  interior = -math.log2(phi(half_bin) - phi(-half_bin))
  edge = -math.log2(1 - phi(-half_bin))  # x_0 = 1 owns the whole upper tail
  np.testing.assert_allclose(nll, [(interior + edge) / 2], rtol=2e-3)


# ---------------------------------------------------------------------------------------------
# DDIM against diffusers


@pytest.mark.parametrize("num_steps", [50, 7])
def test_ddim_timesteps_match_diffusers_leading(num_steps):
  timesteps, prev = sampling.ddim_timesteps(T, num_steps)
  np.testing.assert_array_equal(timesteps, _diffusers_ddim(num_steps).timesteps.numpy())
  stride = T // num_steps
  np.testing.assert_array_equal(prev[:-1], timesteps[:-1] - stride)
  assert prev[-1] == -1 and timesteps[-1] == 0
  with pytest.raises(ValueError, match="num_steps=1001"):
    sampling.ddim_timesteps(T, 1001)


def _relative_error(a, b):
  return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_sampler_matches_diffusers_step_by_step(eta):
  num_steps, shape = 50, (2, 4, 4, 3)
  key = jax.random.key(7)
  x_T = jax.random.normal(jax.random.key(3), shape)
  eps_fn = lambda x, t, step_index: toy_eps(x, t)
  timesteps, _ = sampling.ddim_timesteps(T, num_steps)
  x_0, trajectory = jax.jit(functools.partial(sampling.ddim_sample, eps_fn, timesteps=timesteps,
                                              schedule=SCHEDULE, eta=eta, return_trajectory=True))(
                                                  x_T, key=key)
  assert trajectory.shape == (num_steps,) + shape
  np.testing.assert_array_equal(x_0, trajectory[-1])

  scheduler = _diffusers_ddim(num_steps)
  sample = torch.from_numpy(np.array(x_T))
  errors = []
  for i, t in enumerate(scheduler.timesteps):
    eps = torch.from_numpy(np.array(toy_eps(jnp.asarray(sample.numpy()), jnp.full((2,), int(t)))))
    noise = torch.from_numpy(np.array(sampling.step_noise(key, jnp.int32(i), x_T))) if eta else None
    sample = scheduler.step(eps, t, sample, eta=eta, variance_noise=noise).prev_sample
    errors.append(_relative_error(trajectory[i], sample.numpy()))
  assert max(errors) < 1e-5, errors
  # η = 1 injects noise: the two samplers agree on a different x_0 than η = 0 gives.
  if eta:
    deterministic = sampling.ddim_sample(eps_fn, x_T, timesteps, SCHEDULE)
    assert _relative_error(x_0, deterministic) > 0.1


def test_ddim_step_clip_x0_and_last_step_returns_x0():
  x_t = jnp.full((1, 2, 2, 1), 3.0)
  eps = jnp.zeros_like(x_t)
  x_prev, x0 = sampling.ddim_step(SCHEDULE, x_t, eps, jnp.int32(0), jnp.int32(-1))
  np.testing.assert_allclose(x_prev, x0)  # ᾱ_prev = 1: the last step lands on x̂_0
  np.testing.assert_allclose(x0, 3.0 / np.sqrt(1 - 1e-4), rtol=1e-6)
  clipped, clipped_x0 = sampling.ddim_step(SCHEDULE, x_t, eps, jnp.int32(0), jnp.int32(-1), clip_x0=True)
  np.testing.assert_allclose(clipped, 1.0)
  np.testing.assert_allclose(clipped_x0, 1.0)


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance


def test_cfg_eps_combination_and_official_channel_subset():
  x = jax.random.normal(jax.random.key(0), (3, 4, 4, 4))
  t = jnp.array([10, 500, 990])
  y = jnp.array([0, 1, 2])
  null = 5
  cond = toy_model_fn(x, t, y)[..., :4]
  uncond = toy_model_fn(x, t, jnp.full((3,), null))[..., :4]

  # scale 1: exactly ε_y, one model call on the batch itself.
  calls = []
  counting = lambda x_, t_, y_: calls.append(x_.shape[0]) or toy_model_fn(x_, t_, y_)
  np.testing.assert_array_equal(sampling.cfg_eps(counting, x, t, y, null, 1.0, 4), cond)
  assert calls == [3]

  guided = sampling.cfg_eps(counting, x, t, y, null, 4.0, 4)
  assert calls == [3, 6]  # one doubled batch
  np.testing.assert_allclose(guided, uncond + 4.0 * (cond - uncond), rtol=1e-6, atol=1e-6)
  # A point check by hand: s = 3 at one element.
  e_c, e_u = float(cond[1, 2, 3, 0]), float(uncond[1, 2, 3, 0])
  np.testing.assert_allclose(sampling.cfg_eps(toy_model_fn, x, t, y, null, 3.0, 4)[1, 2, 3, 0],
                             e_u + 3.0 * (e_c - e_u), rtol=1e-6)

  official = sampling.cfg_eps(toy_model_fn, x, t, y, null, 4.0, 4, guided_channels=3)
  np.testing.assert_array_equal(official[..., :3], guided[..., :3])
  np.testing.assert_array_equal(official[..., 3:], cond[..., 3:])
  assert float(jnp.abs(guided[..., 3:] - cond[..., 3:]).max()) > 1e-2
  with pytest.raises(ValueError, match="guided_channels=5"):
    sampling.cfg_eps(toy_model_fn, x, t, y, null, 4.0, 4, guided_channels=5)


# ---------------------------------------------------------------------------------------------
# Guidance hook


def _sample_with(guidance, num_steps=10, return_trajectory=True):
  x_T = jax.random.normal(jax.random.key(5), (2, 4, 4, 3))
  timesteps, _ = sampling.ddim_timesteps(T, num_steps)
  eps_fn = lambda x, t, step_index: toy_eps(x, t)
  run = jax.jit(functools.partial(sampling.ddim_sample, eps_fn, timesteps=timesteps, schedule=SCHEDULE,
                                  guidance=guidance, return_trajectory=return_trajectory))
  return run(x_T)


def _energy_guidance(scale):
  """DAP-shaped: ε + λ·√(1−ᾱ_t)·∇_x E with E = ‖x − 1‖² (a toy energy)."""
  def guidance(x_t, t, step_index, eps):
    grad = jax.grad(lambda x: jnp.sum(jnp.square(x - 1.0)))(x_t)
    return eps + scale * schedule_lib.per_example(jnp.sqrt(1 - SCHEDULE.alphas_cumprod[t]), x_t) * grad
  return guidance


def test_guidance_none_identity_and_zero_scale_are_bit_identical():
  plain, plain_traj = _sample_with(None)
  identity, identity_traj = _sample_with(lambda x, t, i, eps: eps)
  zero, zero_traj = _sample_with(sampling.first_steps_only(_energy_guidance(0.0), 5))
  np.testing.assert_array_equal(identity_traj, plain_traj)
  np.testing.assert_array_equal(zero_traj, plain_traj)
  np.testing.assert_array_equal(zero, plain)


def test_guidance_in_the_first_steps_only():
  num_steps, active = 10, sampling.num_guided_steps(10, 0.5)
  assert active == 5 and sampling.num_guided_steps(50, 0.3) == 15 and sampling.num_guided_steps(50, 0) == 0
  shift = lambda x, t, i, eps: eps - 0.05
  plain, plain_traj = _sample_with(None, num_steps)
  early, early_traj = _sample_with(sampling.first_steps_only(shift, active), num_steps)
  always, always_traj = _sample_with(shift, num_steps)
  # The guided steps match an always-guided run; the sample itself changes.
  np.testing.assert_array_equal(early_traj[:active], always_traj[:active])
  assert _relative_error(early_traj[0], plain_traj[0]) > 1e-4
  assert _relative_error(early, plain) > 1e-3
  # After them the update is plain DDIM: equal to a hand-gated guidance; unequal to always-guided.
  by_hand, by_hand_traj = _sample_with(lambda x, t, i, eps: jnp.where(i < active, eps - 0.05, eps), num_steps)
  np.testing.assert_allclose(early_traj, by_hand_traj, rtol=1e-6, atol=1e-6)
  assert _relative_error(early, always) > 1e-3
  # A guidance active only in the later steps leaves the early trajectory untouched.
  late, late_traj = _sample_with(lambda x, t, i, eps: jnp.where(i >= active, eps - 0.05, eps), num_steps)
  np.testing.assert_array_equal(late_traj[:active], plain_traj[:active])
  assert _relative_error(late, plain) > 1e-3


def test_energy_guidance_lowers_the_energy():
  plain = _sample_with(None, return_trajectory=False)
  guided = _sample_with(sampling.first_steps_only(_energy_guidance(0.2), 5), return_trajectory=False)
  energy = lambda x: float(jnp.sum(jnp.square(x - 1.0)))
  assert energy(guided) < energy(plain)


# ---------------------------------------------------------------------------------------------
# Class-conditional sampling with per-example keys


def _model_apply(variables, x, t, y):
  del variables
  return toy_model_fn(x, t, y)


def test_samples_depend_only_on_each_examples_key():
  labels = jnp.array([0, 1, 2, 1])
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(11), i))(jnp.arange(4))
  sample = jax.jit(functools.partial(sampling.sample_class_conditional, _model_apply, None, shape=(4, 4, 4),
                                     num_classes=3, schedule=SCHEDULE, num_steps=8, cfg_scale=2.0, eta=1.0))
  four = np.asarray(sample(labels, keys))
  np.testing.assert_array_equal(np.asarray(sample(labels, keys)), four)  # deterministic
  two = np.asarray(sample(labels[:2], keys[:2]))
  np.testing.assert_allclose(two, four[:2], rtol=1e-6, atol=1e-6)
  # Reordered batch: each example follows its key.
  order = np.array([2, 0, 3, 1])
  reordered = np.asarray(sample(labels[order], keys[order]))
  np.testing.assert_allclose(reordered, four[order], rtol=1e-6, atol=1e-6)
  assert np.isfinite(four).all() and _relative_error(four[0], four[1]) > 0.1
  # The label steers the sample; x_T is normal(fold_in(key, 0)).
  relabeled = np.asarray(sample(jnp.array([2, 1, 2, 1]), keys))
  assert _relative_error(relabeled[0], four[0]) > 1e-2
  np.testing.assert_array_equal(relabeled[1:], four[1:])
  np.testing.assert_array_equal(sampling.initial_noise(keys[:1], (4, 4, 4))[0],
                                jax.random.normal(jax.random.fold_in(keys[0], 0), (4, 4, 4)))


def test_sampling_is_the_same_sharded_over_eight_devices():
  mesh = mesh_lib.make_mesh(8)
  labels = jnp.arange(8) % 3
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(2), i))(jnp.arange(8))
  sample = functools.partial(sampling.sample_class_conditional, _model_apply, None, shape=(4, 4, 4),
                             num_classes=3, schedule=SCHEDULE, num_steps=5, cfg_scale=3.0, eta=1.0)
  single = np.asarray(jax.jit(sample)(labels, keys))
  data = mesh_lib.data_sharding(mesh)
  sharded = jax.jit(sample, in_shardings=(data, data), out_shardings=data)(labels, keys)
  assert len(sharded.addressable_shards) == 8
  np.testing.assert_allclose(np.asarray(sharded), single, rtol=1e-5, atol=1e-5)


def test_host_driven_sampling_equals_the_scan():
  """The CPU default (one compiled step per DDIM step, driven from Python) computes what the scan does
  also with η > 0 noise and with the batch sharded over 8 devices."""
  labels = jnp.array([0, 1, 2, 1, 0, 2, 1, 0])
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(4), i))(jnp.arange(8))
  kwargs = dict(shape=(4, 4, 4), num_classes=3, schedule=SCHEDULE, num_steps=6, cfg_scale=2.5, eta=1.0)
  scan = np.asarray(jax.jit(functools.partial(sampling.sample_class_conditional, _model_apply, None, **kwargs))(
      labels, keys))
  host = np.asarray(sampling.sample_class_conditional_host(_model_apply, None, labels, keys, **kwargs))
  np.testing.assert_allclose(host, scan, rtol=1e-5, atol=1e-5)  # float rounding: fused differently
  data = mesh_lib.data_sharding(mesh_lib.make_mesh(8))
  sharded = sampling.sample_class_conditional_host(_model_apply, None, jax.device_put(labels, data),
                                                   jax.device_put(keys, data), **kwargs)
  assert len(sharded.addressable_shards) == 8
  np.testing.assert_allclose(np.asarray(sharded), scan, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Training


def _toy_problem(num_examples=16):
  """Two classes of constant 4x4x1 images (−0.5 and +0.5)."""
  labels = np.arange(num_examples) % 2
  images = np.where(labels[:, None, None, None] == 0, -0.5, 0.5) * np.ones((num_examples, 4, 4, 1))
  return {"images": jnp.asarray(images, jnp.float32), "labels": jnp.asarray(labels, jnp.int32),
          "index": jnp.arange(num_examples, dtype=jnp.int32)}


TOY_MODEL = ToyDenoiser(num_classes=2, out_channels=2)
# One optimizer and step configuration for every training test (each compile costs seconds on CPU):
# AdamW with the decay and clipping options on, the learned-variance term on, a short EMA.
TOY_TX = training.make_optimizer(learning_rate=3e-3, weight_decay=1e-4, grad_clip=10.0)
TOY_STEP = functools.partial(training.train_step, apply_fn=TOY_MODEL.apply, schedule=SCHEDULE, tx=TOY_TX,
                             num_classes=2, ema_decay=0.9, learn_sigma_loss=True)


@functools.lru_cache(maxsize=None)
def _toy_state():
  params = jax.jit(TOY_MODEL.init)(jax.random.key(0), jnp.zeros((2, 4, 4, 1)), jnp.zeros((2,), jnp.int32),
                                   jnp.zeros((2,), jnp.int32))["params"]
  return jax.jit(training.create_train_state, static_argnums=1)(params, TOY_TX)


@functools.lru_cache(maxsize=None)
def _jitted_toy_step():
  return jax.jit(TOY_STEP)


def test_training_lowers_the_loss_on_a_toy_problem():
  state, step = _toy_state(), _jitted_toy_step()
  batch, losses = _toy_problem(), []
  for i in range(100):
    state, metrics = step(state, batch, jax.random.fold_in(jax.random.key(1), i))
    losses.append(float(metrics["mse"]))
  assert int(state.step) == 100
  first, last = np.mean(losses[:10]), np.mean(losses[-10:])
  assert last < 0.6 * first, (first, last)


def test_training_draws_uniform_timesteps_and_drops_ten_percent_of_labels():
  n = 20000
  labels = jnp.arange(n) % 7
  draw = jax.jit(training.training_inputs, static_argnums=3,
                 static_argnames=("num_timesteps", "num_classes", "label_dropout"))
  t, noise, dropped = draw(jax.random.key(4), jnp.arange(n), labels, (2, 2, 1), num_timesteps=T,
                           num_classes=7, label_dropout=0.1)
  is_null = np.asarray(dropped) == 7
  assert abs(is_null.mean() - 0.1) < 0.01
  np.testing.assert_array_equal(np.asarray(dropped)[~is_null], np.asarray(labels)[~is_null])
  assert int(t.min()) == 0 and int(t.max()) == T - 1 and abs(float(t.mean()) - 499.5) < 10
  assert abs(float(noise.std()) - 1.0) < 0.02
  # Example i's draws depend only on (key, its global index).
  t_part, noise_part, dropped_part = draw(jax.random.key(4), jnp.arange(100, 110), labels[100:110], (2, 2, 1),
                                          num_timesteps=T, num_classes=7, label_dropout=0.1)
  np.testing.assert_array_equal(t_part, t[100:110])
  np.testing.assert_array_equal(noise_part, noise[100:110])
  np.testing.assert_array_equal(dropped_part, dropped[100:110])
  _, _, kept = draw(jax.random.key(4), jnp.arange(100, 110), labels[100:110], (2, 2, 1), num_timesteps=T,
                     num_classes=7, label_dropout=0.0)
  np.testing.assert_array_equal(kept, labels[100:110])


def test_one_step_loss_values_and_ema():
  state, step = _toy_state(), _jitted_toy_step()
  batch, key = _toy_problem(), jax.random.key(3)
  new_state, metrics = step(state, batch, key)
  assert set(metrics) == {"loss", "mse", "vlb", "grad_norm"}
  for old, new, ema in zip(*(jax.tree_util.tree_leaves(tree) for tree in
                             (state.params, new_state.params, new_state.ema_params))):
    np.testing.assert_allclose(ema, 0.9 * old + 0.1 * new, rtol=1e-6, atol=1e-8)
    assert float(jnp.abs(new - old).max()) > 0  # Adam moved every leaf

  # The loss by hand from the step's own draws: ε-MSE of the model at q_sample(x_0, t, ε), plus the VLB.
  @jax.jit
  def by_hand(params):
    t, noise, model_labels = training.training_inputs(key, batch["index"], batch["labels"], (4, 4, 1),
                                                      num_timesteps=T, num_classes=2, label_dropout=0.1)
    x_t = schedule_lib.q_sample(SCHEDULE, batch["images"], t, noise)
    out = TOY_MODEL.apply({"params": params}, x_t, t, model_labels)
    return (jnp.mean(jnp.square(out[..., :1] - noise)),
            jnp.mean(schedule_lib.vlb_loss(SCHEDULE, out, batch["images"], x_t, t, 1)))
  mse, vlb = by_hand(state.params)
  np.testing.assert_allclose(metrics["mse"], mse, rtol=1e-5)
  np.testing.assert_allclose(metrics["vlb"], vlb, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], metrics["mse"] + metrics["vlb"], rtol=1e-6)
  assert float(metrics["vlb"]) > 0


def test_train_step_is_the_same_whole_or_sharded_over_eight_devices():
  state, batch, key = _toy_state(), _toy_problem(16), jax.random.key(9)
  whole_state, whole_metrics = _jitted_toy_step()(state, batch, key)

  mesh = mesh_lib.make_mesh(8)
  rep, data = mesh_lib.replicated(mesh), mesh_lib.data_sharding(mesh)
  sharded_batch = {name: jax.device_put(value, data) for name, value in batch.items()}
  sharded_step = jax.jit(TOY_STEP, in_shardings=(rep, data, rep), out_shardings=(rep, rep))
  sharded_state, sharded_metrics = sharded_step(jax.device_put(state, rep), sharded_batch, key)
  assert len(sharded_batch["images"].addressable_shards) == 8
  for name in ("loss", "mse", "vlb", "grad_norm"):
    np.testing.assert_allclose(sharded_metrics[name], whole_metrics[name], rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves((sharded_state.params, sharded_state.ema_params)),
                  jax.tree_util.tree_leaves((whole_state.params, whole_state.ema_params))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
