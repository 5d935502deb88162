"""Zoo models: construction, shapes, train/eval behaviour, width rounding, layout helpers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prism_jax import models
from prism_jax.models import layers, registry, shufflenet_v2, torchvision_import


ALL = registry.ZOO  # not available_models(): other test modules register tiny models
NUM_CLASSES = 5


def _init(model, x):
  # Host-side fill: a jitted model.init spends ~20 s compiling RNG code per deep model on CPU.
  return models.random_variables(model, x.shape)


def test_calling_convention_with_real_init():
  model = models.create_model("alexnet", num_classes=NUM_CLASSES, stem="small", width=0.125)
  x = jnp.zeros((2, 32, 32, 3))

  @jax.jit
  def init_and_apply(x):
    variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x,
                           train=False)
    return variables, model.apply(variables, x, train=False)

  variables, logits = init_and_apply(x)
  assert set(variables) == {"params"} and logits.shape == (2, NUM_CLASSES)
  expected = models.random_variables(model, x.shape)
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(expected)


def test_registry_names_and_errors():
  assert set(ALL) == {"resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2",
                      "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "efficientnet_b0", "alexnet"}
  with pytest.raises(ValueError, match="resnet18.*alexnet"):
    models.create_model("resnet19", num_classes=10)
  with pytest.raises(ValueError, match="stem"):
    models.create_model("resnet18", num_classes=10, stem="tiny")


# One architecture per code path (resnet34/101 and shufflenet_v2_x1_0 share theirs with resnet18/50
# and shufflenet_v2_x0_5; every architecture is covered by the imagenet-stem shape test below).
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2", "shufflenet_v2_x0_5",
                                  "efficientnet_b0", "alexnet"])
def test_small_stem_forward_train_and_features(name):
  model = models.create_model(name, num_classes=NUM_CLASSES, stem="small", width=0.25)
  x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
  variables = _init(model, x)

  @jax.jit
  def run(variables, x):
    eval_out = model.apply(variables, x, train=False, return_features=True)
    plain = model.apply(variables, x, train=False)
    train_out = model.apply(variables, x, train=True, mutable=["batch_stats"],
                            rngs={"dropout": jax.random.key(3)})
    return eval_out, plain, train_out

  (logits, features), plain_logits, (train_logits, updates) = run(variables, x)
  assert logits.shape == (2, NUM_CLASSES) and features.ndim == 2 and features.shape[0] == 2
  assert np.all(np.isfinite(logits))
  np.testing.assert_allclose(plain_logits, logits, rtol=1e-6, atol=1e-6)
  assert train_logits.shape == (2, NUM_CLASSES)
  if name == "alexnet":
    assert not variables.get("batch_stats") and not updates.get("batch_stats")
  else:
    old, new = variables["batch_stats"], updates["batch_stats"]
    assert jax.tree_util.tree_structure(old) == jax.tree_util.tree_structure(new)
    changed = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), old, new)
    assert all(jax.tree_util.tree_leaves(changed))


@pytest.mark.parametrize("name", ALL)
def test_imagenet_stem_shapes_at_224(name):
  model = models.create_model(name, num_classes=NUM_CLASSES, stem="imagenet", width=0.25)
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  variables = jax.eval_shape(
      lambda x: model.init({"params": jax.random.key(0)}, x, train=False), x)
  logits, features = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False, return_features=True), variables, x)
  assert logits.shape == (2, NUM_CLASSES) and features.shape[0] == 2


def test_imagenet_stem_runs_at_small_resolution():
  model = models.create_model("shufflenet_v2_x0_5", num_classes=NUM_CLASSES, width=0.25)
  x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  variables = _init(model, x)
  assert jax.jit(lambda: model.apply(variables, x, train=False))().shape == (2, NUM_CLASSES)


def test_width_one_param_counts_match_torchvision():
  # torchvision parameter counts (weights + biases, BN affine included).
  expected = {"resnet18": 11689512, "mobilenet_v2": 3504872, "shufflenet_v2_x0_5": 1366792,
              "shufflenet_v2_x1_0": 2278604, "efficientnet_b0": 5288548, "alexnet": 61100840}
  x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  for name, count in expected.items():
    model = models.create_model(name, num_classes=1000)
    variables = jax.eval_shape(
        lambda x: model.init({"params": jax.random.key(0)}, x, train=False), x)
    assert sum(v.size for v in jax.tree_util.tree_leaves(variables["params"])) == count, name


def test_batchnorm_train_update_uses_flax_momentum_and_unbiased_var():
  bn = layers.BatchNorm()
  x = jax.random.normal(jax.random.key(0), (2, 3, 3, 4)) * 2.0 + 1.0
  variables = bn.init(jax.random.key(1), x, train=False)
  y, updates = bn.apply(variables, x, train=True, mutable=["batch_stats"])
  xs = np.asarray(x, np.float64).reshape(-1, 4)
  np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.1 * xs.mean(0), rtol=1e-5)
  np.testing.assert_allclose(updates["batch_stats"]["var"], 0.9 + 0.1 * xs.var(0, ddof=1), rtol=1e-5)
  # Train mode normalizes with the biased batch variance.
  expected = (xs - xs.mean(0)) / np.sqrt(xs.var(0) + 1e-5)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 4), expected, rtol=1e-4, atol=1e-5)


def test_dropout_only_in_train_mode():
  model = models.create_model("alexnet", num_classes=NUM_CLASSES, stem="small", width=0.125)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  variables = _init(model, x)
  train_apply = jax.jit(lambda key: model.apply(variables, x, train=True, rngs={"dropout": key}))
  assert not np.allclose(train_apply(jax.random.key(1)), train_apply(jax.random.key(2)))
  eval_apply = jax.jit(lambda: model.apply(variables, x, train=False))
  np.testing.assert_array_equal(eval_apply(), eval_apply())


def test_efficientnet_stochastic_depth_is_identity_in_eval():
  model = models.create_model("efficientnet_b0", num_classes=NUM_CLASSES, stem="small", width=0.25)
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  variables = _init(model, x)
  eval_logits = jax.jit(lambda: model.apply(variables, x, train=False))()  # no RNG needed in eval
  train_apply = jax.jit(lambda key: model.apply(variables, x, train=True, mutable=["batch_stats"],
                                                rngs={"dropout": key})[0])
  assert eval_logits.shape == (2, NUM_CLASSES)
  assert not np.allclose(train_apply(jax.random.key(1)), train_apply(jax.random.key(2)))


def _torch_adaptive_avg_pool_reference(x, out):
  n, h, w, c = x.shape
  y = np.zeros((n, out, out, c))
  for i in range(out):
    for j in range(out):
      h0, h1 = (i * h) // out, -(-((i + 1) * h) // out)
      w0, w1 = (j * w) // out, -(-((j + 1) * w) // out)
      y[:, i, j] = x[:, h0:h1, w0:w1].mean(axis=(1, 2))
  return y


@pytest.mark.parametrize("size", [1, 3, 5, 6, 7, 13, 20])
def test_adaptive_avg_pool_matches_torch_bins(size):
  x = np.random.default_rng(size).normal(size=(2, size, size + 1, 3))
  got = layers.adaptive_avg_pool(jnp.asarray(x, jnp.float32), (6, 6))
  np.testing.assert_allclose(got, _torch_adaptive_avg_pool_reference(x, 6), rtol=1e-5, atol=1e-6)


def test_channel_shuffle_matches_torch_nchw_semantics():
  x_nchw = np.arange(2 * 6 * 2 * 3, dtype=np.float32).reshape(2, 6, 2, 3)
  ref = x_nchw.reshape(2, 2, 3, 2, 3).transpose(0, 2, 1, 3, 4).reshape(2, 6, 2, 3)  # torch's view/transpose
  got = shufflenet_v2.channel_shuffle(jnp.asarray(x_nchw.transpose(0, 2, 3, 1)), 2)
  np.testing.assert_array_equal(np.asarray(got).transpose(0, 3, 1, 2), ref)


def test_width_rounding():
  assert layers.make_divisible(32 * 0.25, 8) == 8
  assert layers.make_divisible(116 * 0.5, 8) == 56
  assert layers.scale_channels(116, 1.0) == 116  # width 1 keeps torchvision's counts exactly
  for width in (0.1, 0.25, 0.33, 0.5):
    channels = shufflenet_v2.stage_channels("shufflenet_v2_x1_0", width)
    assert all(c % 4 == 0 and c >= 8 for c in channels)


def test_bfloat16_compute_dtype_runs():
  model = models.create_model("resnet18", num_classes=NUM_CLASSES, stem="small", width=0.125,
                              dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  variables = _init(model, x)
  assert jax.tree_util.tree_leaves(variables)[0].dtype == jnp.float32  # params stay float32
  logits = jax.jit(lambda: model.apply(variables, x, train=False))()
  assert logits.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(logits, np.float32)))


# --- torchvision weight conversion: strictness (no torch needed) ---

def _synthetic_state_dict(arch, num_classes=1000):
  rng = np.random.default_rng(0)
  shapes = torchvision_import.expected_state_dict_shapes(arch, num_classes)
  state_dict = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
  state_dict["bn1.num_batches_tracked"] = np.array(7)  # ignored, as in real torchvision files
  return state_dict


def test_conversion_layout_and_num_classes_inference():
  state_dict = _synthetic_state_dict("resnet18", num_classes=7)
  variables = torchvision_import.torchvision_state_dict_to_variables("resnet18", state_dict)
  params, stats = variables["params"], variables["batch_stats"]
  np.testing.assert_array_equal(params["conv1"]["kernel"], state_dict["conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["fc"]["kernel"], state_dict["fc.weight"].T)
  np.testing.assert_array_equal(params["layer2_0"]["downsample_bn"]["scale"],
                                state_dict["layer2.0.downsample.1.weight"])
  np.testing.assert_array_equal(stats["layer4_1"]["bn2"]["var"], state_dict["layer4.1.bn2.running_var"])
  model = models.create_model("resnet18", num_classes=7)
  torchvision_import.check_variables_match(model, variables, (1, 64, 64, 3))


def test_alexnet_first_classifier_rows_permuted_chw_to_hwc():
  shapes = torchvision_import.expected_state_dict_shapes("alexnet", 3)
  state_dict = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
  weight = np.arange(np.prod(shapes["classifier.1.weight"]), dtype=np.float32).reshape(
      shapes["classifier.1.weight"])
  state_dict["classifier.1.weight"] = weight
  kernel = torchvision_import.torchvision_state_dict_to_variables("alexnet", state_dict)["params"]["fc1"]["kernel"]
  c, h, w = 5, 2, 4  # input unit (c, h, w): torch row c*36 + h*6 + w, ours h*6*256 + w*256 + c
  np.testing.assert_array_equal(kernel[h * 6 * 256 + w * 256 + c], weight[:, c * 36 + h * 6 + w])


def test_conversion_rejects_missing_extra_and_misshaped_keys():
  base = _synthetic_state_dict("resnet18")
  missing = dict(base)
  del missing["layer3.1.bn2.running_mean"]
  with pytest.raises(ValueError, match="missing key 'layer3.1.bn2.running_mean'"):
    torchvision_import.torchvision_state_dict_to_variables("resnet18", missing)
  extra = dict(base, **{"layer5.0.conv1.weight": np.zeros((2, 2), np.float32)})
  with pytest.raises(ValueError, match="unexpected state_dict key 'layer5.0.conv1.weight'"):
    torchvision_import.torchvision_state_dict_to_variables("resnet18", extra)
  bad = dict(base, **{"layer1.0.conv2.weight": np.zeros((64, 64, 1, 1), np.float32)})
  with pytest.raises(ValueError, match=r"'layer1.0.conv2.weight' has shape \(64, 64, 1, 1\).*\(64, 64, 3, 3\)"):
    torchvision_import.torchvision_state_dict_to_variables("resnet18", bad)
  with pytest.raises(ValueError, match=r"'fc.weight' has shape \(1000, 512\).*\(10, 512\)"):
    torchvision_import.torchvision_state_dict_to_variables("resnet18", base, num_classes=10)


def test_check_variables_match_names_first_mismatch():
  model = models.create_model("resnet18", num_classes=4, stem="small", width=0.125)
  variables = models.random_variables(model, (1, 16, 16, 3))
  torchvision_import.check_variables_match(model, variables, (1, 16, 16, 3))
  wrong = jax.tree_util.tree_map(lambda v: v, variables)
  wrong["params"]["fc"]["kernel"] = np.zeros((64, 5), np.float32)
  with pytest.raises(ValueError, match=r"'params/fc/kernel' has shape \(64, 5\).*\(64, 4\)"):
    torchvision_import.check_variables_match(model, wrong, (1, 16, 16, 3))
  del wrong["batch_stats"]["bn1"]
  with pytest.raises(ValueError, match="missing key 'batch_stats/bn1/mean'"):
    torchvision_import.check_variables_match(model, wrong, (1, 16, 16, 3))


@pytest.mark.parametrize("kernel,stride,groups,size", [(3, 2, 6, 8), (5, 1, 6, 7), (1, 1, 1, 5),
                                                       (3, 1, 1, 5), (1, 2, 1, 6)])
def test_cpu_conv_forms_match_lax_conv(kernel, stride, groups, size):
  x = jax.random.normal(jax.random.key(0), (2, size, size, 6))
  pad = (kernel - 1) // 2
  direct = layers.Conv(6, kernel, stride, pad, groups, use_bias=True, impl="direct")
  reference = layers.Conv(6, kernel, stride, pad, groups, use_bias=True, impl="lax")
  variables = jax.jit(direct.init)(jax.random.key(1), x)
  assert jax.tree_util.tree_map(jnp.shape, variables) == jax.tree_util.tree_map(
      jnp.shape, nn.Conv(6, (kernel, kernel), feature_group_count=groups).init(jax.random.key(1), x))

  @jax.jit
  def outputs_and_grads(variables, x):
    return [(m.apply(variables, x),
             jax.grad(lambda v, x: jnp.sum(jnp.sin(m.apply(v, x))), argnums=(0, 1))(variables, x))
            for m in (direct, reference)]

  (out_direct, grads_direct), (out_ref, grads_ref) = outputs_and_grads(variables, x)
  np.testing.assert_allclose(out_direct, out_ref, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(grads_direct), jax.tree_util.tree_leaves(grads_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
