"""Optimizers and schedules: values checked against hand computation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prism_jax.train import optim


def test_warmup_cosine_values():
  sched = optim.warmup_cosine(0.1, total_steps=100, warmup_steps=10)
  np.testing.assert_allclose(float(sched(0)), 0.0)
  np.testing.assert_allclose(float(sched(5)), 0.05, rtol=1e-6)
  np.testing.assert_allclose(float(sched(10)), 0.1, rtol=1e-6)
  # Half-way through the decay phase (step 55 of 10..100): 0.1 * 0.5 * (1 + cos(pi/2)).
  np.testing.assert_allclose(float(sched(55)), 0.05, rtol=1e-5)
  np.testing.assert_allclose(float(sched(100)), 0.0, atol=1e-8)


def test_cosine_without_warmup_starts_at_peak():
  sched = optim.warmup_cosine(0.2, total_steps=10, warmup_steps=0)
  np.testing.assert_allclose(float(sched(0)), 0.2, rtol=1e-6)
  np.testing.assert_allclose(float(sched(5)), 0.1, rtol=1e-5)


def test_decay_mask_excludes_bn_and_biases():
  params = {"conv": {"kernel": jnp.ones((3, 3, 3, 8))}, "bn": {"scale": jnp.ones(8), "bias": jnp.zeros(8)},
            "fc": {"kernel": jnp.ones((8, 2)), "bias": jnp.zeros(2)}}
  mask = optim.decay_mask(params)
  assert mask == {"conv": {"kernel": True}, "bn": {"scale": False, "bias": False},
                  "fc": {"kernel": True, "bias": False}}


def test_sgd_matches_pytorch_update_rule():
  # PyTorch SGD: g' = g + wd*p ; buf = m*buf + g' ; p -= lr*buf  (decay only on kernels here).
  lr, wd, m = 0.1, 0.01, 0.9
  tx = optim.make_optimizer("sgd", optax.constant_schedule(lr), weight_decay=wd, momentum=m)
  params = {"w": {"kernel": jnp.array([[1.0, -2.0]])}, "b": {"bias": jnp.array([0.5])}}
  grads = {"w": {"kernel": jnp.array([[0.5, 0.5]])}, "b": {"bias": jnp.array([1.0])}}
  state = tx.init(params)
  buf_k, buf_b = np.zeros((1, 2)), np.zeros(1)
  pk, pb = np.array([[1.0, -2.0]]), np.array([0.5])
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    buf_k = m * buf_k + (np.array([[0.5, 0.5]]) + wd * pk)
    buf_b = m * buf_b + np.array([1.0])
    pk, pb = pk - lr * buf_k, pb - lr * buf_b
  np.testing.assert_allclose(params["w"]["kernel"], pk, rtol=1e-6)
  np.testing.assert_allclose(params["b"]["bias"], pb, rtol=1e-6)


def test_adamw_decays_only_kernels():
  tx = optim.make_optimizer("adamw", optax.constant_schedule(0.0), weight_decay=0.5)
  params = {"k": {"kernel": jnp.ones((2, 2))}, "b": {"bias": jnp.ones(2)}}
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  # lr 0 => no update at all, decay is scaled by lr too (decoupled AdamW semantics).
  np.testing.assert_allclose(updates["k"]["kernel"], 0.0)
  tx = optim.make_optimizer("adamw", optax.constant_schedule(0.1), weight_decay=0.5)
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(updates["k"]["kernel"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_allclose(updates["b"]["bias"], 0.0)


def test_unknown_optimizer_is_named():
  with pytest.raises(ValueError, match="optimizer='lamb'"):
    optim.make_optimizer("lamb", optax.constant_schedule(0.1), weight_decay=0.0)
