"""CPU depthwise conv (k*k shifted slices behind a fusion boundary) against lax.conv_general_dilated.

`layers.Conv` computes depthwise convs on CPU as a sum of shifted, strided slices (impl='direct',
the CPU default) instead of XLA's grouped convolution (impl='lax'). Both must give the same outputs
and gradients to float32 rounding, with the same parameters, so torchvision imports and existing
checkpoints work with either.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prism_jax import models
from prism_jax.models import layers, mobilenet_v2


def _relu6_loss(module):
  # ReLU6 after the conv: its mask makes the cotangent depend on the conv output, the case the
  # fusion boundary is for; the squares make the cotangent vary from element to element.
  def loss(variables, x):
    return jnp.sum(jnp.square(mobilenet_v2.relu6(module.apply(variables, x) + 0.5)))
  return loss


@pytest.mark.parametrize("kernel,stride,size,padding", [
    (3, 1, 9, None), (3, 2, 9, None), (5, 1, 7, None), (5, 2, 11, None), (3, 2, 8, None),
    (3, 1, 7, 0), (5, 2, 9, 1)])
def test_depthwise_direct_matches_lax(kernel, stride, size, padding):
  channels = 12
  x = jax.random.normal(jax.random.key(0), (3, size, size, channels))
  direct = layers.conv(channels, kernel, stride, padding=padding, groups=channels)
  reference = direct.clone(impl="lax")
  direct = direct.clone(impl="direct")
  variables = jax.jit(direct.init)(jax.random.key(1), x)
  assert variables["params"]["kernel"].shape == (kernel, kernel, 1, channels)

  @jax.jit
  def outputs_and_grads(variables, x):
    return [(m.apply(variables, x), jax.grad(_relu6_loss(m), argnums=(0, 1))(variables, x))
            for m in (direct, reference)]

  (out, (grad_v, grad_x)), (out_ref, (grad_v_ref, grad_x_ref)) = outputs_and_grads(variables, x)
  pad = (kernel - 1) // 2 if padding is None else padding
  expected_size = (size + 2 * pad - kernel) // stride + 1
  assert out.shape == out_ref.shape == (3, expected_size, expected_size, channels)
  np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(grad_x_ref).max()) > 0
  np.testing.assert_allclose(grad_x, grad_x_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(grad_v["params"]["kernel"], grad_v_ref["params"]["kernel"],
                             rtol=1e-4, atol=1e-4)


def test_depthwise_direct_under_vmap_and_with_nan_kernel():
  channels = 6
  module = layers.conv(channels, 3, 2, groups=channels).clone(impl="direct")
  reference = module.clone(impl="lax")
  x = jax.random.normal(jax.random.key(0), (4, 2, 7, 7, channels))
  variables = jax.jit(module.init)(jax.random.key(1), x[0])
  per_image = jax.jit(jax.vmap(lambda x: module.apply(variables, x)))(x)
  np.testing.assert_allclose(per_image, jax.vmap(lambda x: reference.apply(variables, x))(x),
                             rtol=1e-5, atol=1e-5)
  # The boundary's predicate is false for a NaN kernel[0, 0, 0, 0]; the values must not change.
  bad = jax.tree_util.tree_map(lambda v: v, variables)
  bad["params"]["kernel"] = bad["params"]["kernel"].at[0, 0, 0, 0].set(jnp.nan)
  out = jax.jit(module.apply)(bad, x[0])
  np.testing.assert_allclose(out, reference.apply(bad, x[0]), rtol=1e-5, atol=1e-5,
                             equal_nan=True)
  assert bool(jnp.isnan(out[..., 0]).all()) and not bool(jnp.isnan(out[..., 1:]).any())


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the boundary is for XLA:CPU fusion")
def test_depthwise_input_gradient_does_not_recompute_the_forward_sum():
  # Without a fusion boundary XLA:CPU fuses the k*k-tap forward sum (through ReLU6's mask) into
  # each of the k*k shifted reads of the input gradient: one fusion with k*k forward slices plus
  # k*k pads. With it, the conditional stays and no fusion has both.
  channels = 16
  module = layers.conv(channels, 3, 1, groups=channels).clone(impl="direct")
  x = jnp.ones((2, 9, 9, channels))
  variables = module.init(jax.random.key(0), x)
  grad = jax.jit(jax.grad(lambda x, v: _relu6_loss(module)(v, x)))
  hlo = grad.lower(x, variables).compile().as_text()
  assert " conditional(" in hlo
  for computation in hlo.split("\n\n"):
    assert not (computation.count(" pad(") >= 9 and computation.count(" slice(") >= 18), computation


def _randomized(variables, seed=0):
  """Random BN statistics and affine terms, so ReLU6 clips on both sides."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    if name in ("scale", "var"):
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    if name in ("bias", "mean"):
      return (0.2 * rng.standard_normal(leaf.shape)).astype(np.float32)
    return leaf
  return jax.tree_util.tree_map_with_path(fill, variables)


def test_mobilenet_v2_small_stem_unchanged_by_cpu_depthwise(monkeypatch):
  model = models.create_model("mobilenet_v2", num_classes=10, stem="small", width=1.0)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  variables = _randomized(models.random_variables(model, x.shape))

  def logits_and_input_grad():  # fresh jits: the implementation is chosen at trace time
    apply = lambda v, x: model.apply(v, x, train=False)
    logits = jax.jit(apply)(variables, x)
    grad = jax.jit(jax.grad(lambda x, v: jnp.sum(jnp.sin(apply(v, x)))))(x, variables)
    return np.asarray(logits), np.asarray(grad)

  monkeypatch.setattr(layers, "_use_cpu_forms", lambda impl: True)
  logits, grad = logits_and_input_grad()
  monkeypatch.setattr(layers, "_use_cpu_forms", lambda impl: False)
  logits_ref, grad_ref = logits_and_input_grad()
  scale = np.abs(logits_ref).max()
  assert scale > 0.1
  np.testing.assert_allclose(logits, logits_ref, rtol=1e-4, atol=1e-5 * scale)
  np.testing.assert_allclose(grad, grad_ref, rtol=1e-3, atol=1e-4 * np.abs(grad_ref).max())
