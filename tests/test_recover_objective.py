"""The recovery objective against hand computation on a tiny network."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prism_jax.models import bn_stats, layers
from prism_jax.recover import engine, objective


class TinyNet(nn.Module):
  """conv -> BN -> relu -> conv -> BN -> pool -> dense: two BN layers with known inputs."""

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    h1 = layers.conv(4, 3, name="conv1")(x)
    a1 = nn.relu(layers.BatchNorm(name="bn1")(h1, train))
    h2 = layers.conv(3, 1, name="conv2")(a1)
    a2 = nn.relu(layers.BatchNorm(name="bn2")(h2, train))
    feats = jnp.mean(a2, axis=(1, 2))
    logits = nn.Dense(5, name="fc")(feats)
    return (logits, feats) if return_features else logits


def _setup(seed=0):
  model = TinyNet()
  x = jax.random.normal(jax.random.key(seed), (6, 5, 5, 3))
  variables = model.init(jax.random.key(1), x)
  rng = np.random.default_rng(seed)
  stats = jax.tree_util.tree_map(lambda v: jnp.asarray(rng.uniform(0.2, 1.5, v.shape), jnp.float32),
                                 variables["batch_stats"])
  return model, {"params": variables["params"], "batch_stats": stats}, x


def _bn_inputs(model, variables, x):
  """The BN inputs computed by hand from the parameters (eval mode)."""
  p, s = variables["params"], variables["batch_stats"]
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME" if k.shape[0] == 3 else "VALID",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  h1 = conv(x, p["conv1"]["kernel"])
  a1 = jax.nn.relu((h1 - s["bn1"]["mean"]) / jnp.sqrt(s["bn1"]["var"] + 1e-5) * p["bn1"]["scale"] + p["bn1"]["bias"])
  h2 = conv(a1, p["conv2"]["kernel"])
  return [np.asarray(h1), np.asarray(h2)]


def test_bn_loss_equals_hand_computation():
  model, variables, x = _setup()
  out = bn_stats.forward_with_bn_stats(model, variables, x)
  assert len(out.bn) == 2
  expected = 0.0
  for layer, (h, name) in enumerate(zip(_bn_inputs(model, variables, x), ("bn1", "bn2"))):
    mu, var = h.mean(axis=(0, 1, 2)), h.var(axis=(0, 1, 2))  # numpy var is the biased variance
    run = variables["batch_stats"][name]
    term = np.linalg.norm(mu - np.asarray(run["mean"])) + np.linalg.norm(var - np.asarray(run["var"]))
    expected += (10.0 if layer == 0 else 1.0) * term
  got = objective.bn_matching_loss(out.bn, first_bn_multiplier=10.0)
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)
  # The first-BN multiplier scales only the first layer's term.
  got1 = objective.bn_matching_loss(out.bn, first_bn_multiplier=1.0)
  h1 = _bn_inputs(model, variables, x)[0]
  run1 = variables["batch_stats"]["bn1"]
  first = (np.linalg.norm(h1.mean((0, 1, 2)) - np.asarray(run1["mean"])) +
           np.linalg.norm(h1.var((0, 1, 2)) - np.asarray(run1["var"])))
  np.testing.assert_allclose(float(got) - float(got1), 9.0 * first, rtol=1e-4)


def test_bn_loss_is_zero_when_batch_statistics_equal_running_statistics():
  model, variables, x = _setup()
  out = bn_stats.forward_with_bn_stats(model, variables, x)
  matched = {"params": variables["params"], "batch_stats": {
      "bn1": {"mean": out.bn[0].batch_mean, "var": out.bn[0].batch_var},
      "bn2": {"mean": variables["batch_stats"]["bn2"]["mean"], "var": variables["batch_stats"]["bn2"]["var"]}}}
  # With bn1's running stats set to its batch stats, bn2's input changes; match it too.
  out = bn_stats.forward_with_bn_stats(model, matched, x)
  matched["batch_stats"]["bn2"] = {"mean": out.bn[1].batch_mean, "var": out.bn[1].batch_var}
  out = bn_stats.forward_with_bn_stats(model, matched, x)
  assert float(objective.bn_matching_loss(out.bn, 10.0)) == pytest.approx(0.0, abs=1e-5)
  # ... and its gradient is finite there (safe norm), not NaN.
  g = jax.grad(lambda x: objective.bn_matching_loss(bn_stats.forward_with_bn_stats(model, matched, x).bn, 10.0))(x)
  assert np.isfinite(np.asarray(g)).all()


def test_no_bn_layers_gives_zero():
  assert float(objective.bn_matching_loss((), 10.0)) == 0.0


def test_cross_entropy_is_the_batch_mean():
  logits = jnp.array([[2.0, 0.0], [0.0, 1.0]])
  labels = jnp.array([0, 0])
  lse = np.log(np.exp([2.0, 0.0]).sum()), np.log(np.exp([0.0, 1.0]).sum())
  expected = ((lse[0] - 2.0) + (lse[1] - 0.0)) / 2
  np.testing.assert_allclose(float(objective.cross_entropy(logits, labels)), expected, rtol=1e-6)


def test_adam_update_matches_torch_and_clips():
  cfg = engine.StepConfig(teacher_names=("a",), image_size=2, low=(-1.0, -1.0, -1.0), high=(1.0, 1.0, 1.0),
                          learning_rate=0.1, first_bn_multiplier=10.0, jitter=0)
  x = jnp.full((1, 2, 2, 3), 0.5)
  g = jnp.full((1, 2, 2, 3), 0.2)
  m = v = jnp.zeros_like(x)
  new, m1, v1 = engine.adam_update(x, m, v, g, jnp.int32(0), jnp.int32(10), cfg)
  # First step: m_hat = g, v_hat = g^2 -> update = lr * g / (|g| + eps) = lr (cos factor 1 at t=0).
  np.testing.assert_allclose(np.asarray(new), 0.5 - 0.1 * 0.2 / (0.2 + 1e-8), rtol=1e-6)
  # t = 5 of T = 10: lr is halved by the cosine.
  new5, _, _ = engine.adam_update(x, m, v, g, jnp.int32(5), jnp.int32(10), cfg)
  bias1, bias2 = 1 - 0.5 ** 6, 1 - 0.9 ** 6
  m6, v6 = 0.5 * 0.2, 0.1 * 0.04
  expected = 0.5 - 0.05 * (m6 / bias1) / (np.sqrt(v6) / np.sqrt(bias2) + 1e-8)
  np.testing.assert_allclose(np.asarray(new5), expected, rtol=1e-5)
  # Clipping keeps pixels in the valid range however large the step.
  huge, _, _ = engine.adam_update(x, m, v, -1e6 * jnp.ones_like(x), jnp.int32(0), jnp.int32(10),
                                  engine.StepConfig(("a",), 2, (-0.3, -0.4, -0.5), (0.6, 0.7, 0.8), 100.0, 10.0, 0))
  np.testing.assert_allclose(np.asarray(huge)[..., 0], 0.6)
  np.testing.assert_allclose(np.asarray(huge)[..., 2], 0.8)
  low, _, _ = engine.adam_update(x, m, v, 1e6 * jnp.ones_like(x), jnp.int32(0), jnp.int32(10),
                                 engine.StepConfig(("a",), 2, (-0.3, -0.4, -0.5), (0.6, 0.7, 0.8), 100.0, 10.0, 0))
  np.testing.assert_allclose(np.asarray(low)[..., 1], -0.4)


def _cfg(**kw):
  return engine.StepConfig(("tiny",), 5, (-3.0,) * 3, (3.0,) * 3, 0.05, 10.0, 1, **kw)


@pytest.mark.parametrize("remat", [True, False])
def test_teacher_gradient_in_pieces_is_the_whole_batch_gradient(remat):
  model, variables, x = _setup(seed=2)
  x = jnp.concatenate([x, x[:1] * 0.5])  # 7 rows: pieces of 2, 2, 3
  labels = jnp.arange(7) % 5
  cfg = _cfg(remat=remat)
  want = jax.jit(lambda x: engine.teacher_loss_grad(x, labels, 1.0, 0.3, model, variables, cfg))(x)
  # Independent check of the one-piece path: autodiff of the objective as written in SPEC 4.1.
  def loss(x):
    out = bn_stats.forward_with_bn_stats(model, variables, x)
    return (objective.cross_entropy(out.logits, labels) +
            0.3 * objective.bn_matching_loss(out.bn, 10.0))
  np.testing.assert_allclose(want[0], jax.jit(jax.grad(loss))(x), rtol=1e-5, atol=1e-6)
  for pieces in ((3,) if remat else (2, 7)):
    got = jax.jit(lambda x: engine.teacher_loss_grad(x, labels, 1.0, 0.3, model, variables, cfg,
                                                     pieces=pieces))(x)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5)
    np.testing.assert_allclose(got[2], want[2], rtol=1e-4)
  assert float(jnp.abs(want[0]).max()) > 1e-4  # the gradient is not trivially zero


def test_group_gradient_gives_each_unit_only_its_teachers():
  model_a, vars_a, x = _setup(seed=3)
  _, vars_b, _ = _setup(seed=4)
  cfg = engine.StepConfig(("a", "b"), 5, (-3.0,) * 3, (3.0,) * 3, 0.05, 10.0, 1)
  images = jnp.stack([x, x * 0.7, x + 0.1])                   # 3 units of 6 images
  labels = jnp.tile(jnp.arange(6)[None] % 5, (3, 1))
  keys = jax.random.split(jax.random.key(0), 3)
  ce = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])        # unit 2 is frozen
  bn = jnp.asarray([[0.5, 0.5], [0.0, 1.0], [0.0, 0.0]])
  run = jax.jit(lambda images, labels, keys, ce, bn, tvars: engine.group_loss_grad(
      images, labels, keys, ce, bn, tuple((model_a, v) for v in tvars), cfg))
  grad, ce_total, bn_total = run(images, labels, keys, ce, bn, (vars_a, vars_b))
  for u in range(2):  # each unit alone equals its row of the group
    g1, c1, b1 = run(images[u:u + 1], labels[u:u + 1], keys[u:u + 1], ce[u:u + 1], bn[u:u + 1],
                     (vars_a, vars_b))
    np.testing.assert_allclose(grad[u], g1[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ce_total[u], c1[0], rtol=1e-5)
    np.testing.assert_allclose(bn_total[u], b1[0], rtol=1e-5)
  # Unit 1 uses teacher b only: a teacher a that yields NaN changes nothing for it (no 0 * NaN).
  broken_a = jax.tree_util.tree_map(lambda v: jnp.full_like(v, jnp.nan), vars_a)
  g_nan, c_nan, b_nan = run(images, labels, keys, ce, bn, (broken_a, vars_b))
  assert np.isnan(np.asarray(b_nan[0]))
  np.testing.assert_array_equal(g_nan[1], grad[1])
  np.testing.assert_array_equal(b_nan[1], bn_total[1])
  np.testing.assert_array_equal(grad[2], 0.0)
  assert float(ce_total[2]) == 0.0 and float(bn_total[2]) == 0.0


def test_safe_norm_has_zero_gradient_at_zero_and_keeps_nan():
  np.testing.assert_allclose(objective.safe_norm(jnp.asarray([3.0, 4.0])), 5.0)
  np.testing.assert_array_equal(jax.grad(objective.safe_norm)(jnp.zeros(3)), 0.0)
  assert np.isnan(objective.safe_norm(jnp.asarray([np.nan, 1.0])))  # the NaN check must see it
