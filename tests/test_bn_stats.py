"""BN statistics contract (SPEC 2.2): values, forward order, gradients, jit and vmap."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prism_jax import models
from prism_jax.models import layers, torchvision_import


class _TwoBN(nn.Module):
  """BN names sort opposite to forward order ('z_bn' runs first): order must not come from keys."""

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    x = layers.BatchNorm(name="z_bn")(x, train)
    x = layers.conv(4, 3, 2, name="conv")(x)
    x = layers.BatchNorm(name="a_bn")(x, train)
    features = layers.global_avg_pool(x)
    logits = nn.Dense(2, name="fc")(features)
    return (logits, features) if return_features else logits


def _randomize_bn(variables, seed=0):
  """Distinct running statistics per layer, so that order mistakes show up in values."""
  rng = np.random.default_rng(seed)
  stats = jax.tree_util.tree_map(
      lambda v: (rng.uniform(0.5, 2.0, v.shape) if v.ndim else v).astype(np.float32),
      variables["batch_stats"])
  return {**variables, "batch_stats": stats}


def test_stats_equal_hand_computed_moments_of_bn_inputs():
  model = _TwoBN()
  x = jax.random.normal(jax.random.key(0), (3, 9, 9, 3)) * 1.5 + 0.3
  variables = _randomize_bn(model.init(jax.random.key(1), x))
  out = models.forward_with_bn_stats(model, variables, x)
  assert [s.batch_mean.shape for s in out.bn] == [(3,), (4,)]

  # BN 1 sees the images; BN 2 sees conv(eval-normalized images), computed here by hand.
  bs, p = variables["batch_stats"], variables["params"]
  xs = np.asarray(x, np.float64)
  normed = (xs - bs["z_bn"]["mean"]) / np.sqrt(bs["z_bn"]["var"] + 1e-5) * p["z_bn"]["scale"] \
      + p["z_bn"]["bias"]
  conv_in = jnp.asarray(normed, jnp.float32)
  bn2_in = np.asarray(jax.lax.conv_general_dilated(
      conv_in, p["conv"]["kernel"], (2, 2), ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest"), np.float64)
  for stat, bn_input, name in ((out.bn[0], xs, "z_bn"), (out.bn[1], bn2_in, "a_bn")):
    flat = bn_input.reshape(-1, bn_input.shape[-1])
    np.testing.assert_allclose(stat.batch_mean, flat.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stat.batch_var, flat.var(0), rtol=1e-5, atol=1e-6)  # biased
    np.testing.assert_array_equal(stat.running_mean, bs[name]["mean"])
    np.testing.assert_array_equal(stat.running_var, bs[name]["var"])
    assert all(v.dtype == jnp.float32 for v in stat)
  np.testing.assert_allclose(out.logits, model.apply(variables, x), rtol=1e-6)


# resnet50 (downsample after the main path) and shufflenet (two branches) have the orders that are
# easiest to get wrong; the torchvision parity tests check the order of every architecture.
@pytest.mark.parametrize("name", ["resnet50", "shufflenet_v2_x0_5"])
def test_forward_order_matches_torchvision_order(name):
  # The torchvision key map lists BN layers in torch's forward order; the structure at a small
  # stem and width is the same as at imagenet/width 1, so its BN paths name the expected order.
  model = models.create_model(name, num_classes=3, stem="small", width=0.125)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  variables = _randomize_bn(models.random_variables(model, x.shape))
  out = jax.jit(functools.partial(models.forward_with_bn_stats, model))(variables, x)
  bn_paths = [flax_path for _, flax_path, kind in torchvision_import.KEY_MAPS[name](name) if kind == "bn"]
  assert len(out.bn) == len(bn_paths)
  for stat, path in zip(out.bn, bn_paths):
    node = variables["batch_stats"]
    for part in path.split("/"):
      node = node[part]
    np.testing.assert_array_equal(stat.running_mean, node["mean"], err_msg=path)
    np.testing.assert_array_equal(stat.running_var, node["var"], err_msg=path)


def _bn_loss(model, variables, images):
  out = models.forward_with_bn_stats(model, variables, images)
  return sum(jnp.linalg.norm(s.batch_mean - s.running_mean) + jnp.linalg.norm(s.batch_var - s.running_var)
             for s in out.bn)


def test_grad_wrt_images_is_finite_and_nonzero():
  model = models.create_model("resnet18", num_classes=3, stem="small", width=0.125)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  variables = models.random_variables(model, x.shape)
  grad = jax.jit(jax.grad(lambda images: _bn_loss(model, variables, images)))(x)
  assert grad.shape == x.shape
  assert np.all(np.isfinite(grad)) and float(jnp.max(jnp.abs(grad))) > 0


def test_vmap_over_stacked_batches_equals_per_batch_loop():
  model = models.create_model("resnet18", num_classes=3, stem="small", width=0.125)
  stacked = jax.random.normal(jax.random.key(0), (3, 2, 8, 8, 3)) * jnp.arange(1, 4)[:, None, None, None, None]
  variables = models.random_variables(model, stacked.shape[1:])
  forward = functools.partial(models.forward_with_bn_stats, model, variables)
  batched = jax.jit(jax.vmap(forward))(stacked)
  single = jax.jit(forward)
  for b in range(stacked.shape[0]):
    ref = single(stacked[b])
    np.testing.assert_allclose(batched.logits[b], ref.logits, rtol=1e-5, atol=1e-6)
    for got, want in zip(batched.bn, ref.bn):
      np.testing.assert_allclose(got.batch_mean[b], want.batch_mean, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(got.batch_var[b], want.batch_var, rtol=1e-5, atol=1e-6)
  # Different batches really have different statistics (each batch is its own population).
  assert not np.allclose(batched.bn[0].batch_var[0], batched.bn[0].batch_var[2])


def test_alexnet_has_no_bn_stats():
  model = models.create_model("alexnet", num_classes=3, stem="small", width=0.125)
  x = jnp.zeros((2, 32, 32, 3))
  out = jax.jit(functools.partial(models.forward_with_bn_stats, model))(
      models.random_variables(model, x.shape), x)
  assert out.bn == () and out.logits.shape == (2, 3) and out.features.shape[0] == 2
