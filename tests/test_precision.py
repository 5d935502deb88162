"""The precision policy: per-stage resolution per backend, validation, float32 parameters / BN
statistics / optimizer state under bfloat16 compute, and bfloat16 training close to float32."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from prism_jax import models
from prism_jax.train import optim, precision, state as state_lib, steps


def test_auto_resolves_per_backend():
  config = common.base_config()
  for stage in precision.STAGES:  # CPU: exactly today's programs
    policy = precision.resolve(config, stage, backend="cpu")
    assert policy.compute_dtype == jnp.float32 and policy.matmul_precision == "default"
    assert policy.is_float32_default and policy.fingerprint() == {}
  for backend in ("gpu", "tpu"):
    recover = precision.resolve(config, "recover", backend=backend)
    assert recover.compute_dtype == jnp.float32 and recover.matmul_precision == "highest"
    for stage in ("squeeze", "relabel", "train"):
      policy = precision.resolve(config, stage, backend=backend)
      assert policy.compute_dtype == jnp.bfloat16 and policy.matmul_precision == "default"
      assert policy.fingerprint() == {"precision": {"compute_dtype": "bfloat16", "matmul_precision": "default"}}
  config.precision.train.compute_dtype = "float32"  # explicit settings win over 'auto'
  config.precision.train.matmul_precision = "high"
  policy = precision.resolve(config, "train", backend="tpu")
  assert (policy.compute_dtype, policy.matmul_precision) == (jnp.float32, "high")


@pytest.mark.parametrize("field,value,message", [
    ("compute_dtype", "float16", "config.precision.train.compute_dtype='float16': expected 'auto'"),
    ("matmul_precision", "fastest", "config.precision.train.matmul_precision='fastest': expected 'auto'"),
    ("param_dtype", "bfloat16", "config.precision.train.param_dtype='bfloat16': expected 'float32'"),
])
def test_bad_values_name_the_field(field, value, message):
  config = common.base_config()
  config.precision.train[field] = value
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    precision.resolve(config, "train", backend="cpu")
  from prism_jax import config_checks
  with pytest.raises(ValueError, match="config.precision.train"):
    config_checks.validate(config)


def test_highest_precision_reaches_the_traced_convolutions():
  config = common.base_config()
  x, w = jnp.ones((1, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
  conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                           dimension_numbers=("NHWC", "HWIO", "NHWC")))
  with precision.resolve(config, "recover", backend="tpu").scope():
    highest = conv.lower(x, w).as_text()
  with precision.resolve(config, "recover", backend="cpu").scope():
    default = conv.lower(x, w).as_text()
  assert "HIGHEST" in highest and "HIGHEST" not in default


def _train(dtype, steps_count=40):
  model = models.create_model("resnet18", num_classes=4, stem="small", width=0.125, dtype=dtype)
  tx = optim.make_optimizer("adamw", 3e-3, weight_decay=0.0, momentum=0.9)
  state = state_lib.create_train_state(model, tx, jax.random.key(0), image_shape=(8, 8, 3))
  rng = np.random.default_rng(0)
  labels = np.arange(16) % 4
  images = np.clip(rng.normal(60 * labels[:, None, None, None] + 40, 25, (16, 8, 8, 3)), 0, 255).astype(np.uint8)
  step = jax.jit(functools.partial(steps.classification_train_step, mean=(0.5,) * 3, std=(0.25,) * 3))
  losses = []
  for i in range(steps_count):
    state, metrics = step(state, images, labels, jax.random.key(i))
    losses.append(float(metrics["loss"]))
  return model, state, np.array(losses)


def test_bfloat16_compute_trains_like_float32_and_keeps_float32_state():
  _, state32, losses32 = _train(jnp.float32)
  model16, state16, losses16 = _train(jnp.bfloat16)
  assert losses32[-1] < 0.5 * losses32[0]  # the toy problem is learned
  np.testing.assert_allclose(losses16[-5:].mean(), losses32[-5:].mean(), rtol=0.25, atol=0.05)
  # Parameters, BN running statistics and optimizer state stay float32 under bfloat16 compute.
  for tree in (state16.params, state16.batch_stats, state16.opt_state):
    dtypes = {leaf.dtype for leaf in jax.tree_util.tree_leaves(tree) if hasattr(leaf, "dtype")
              and jnp.issubdtype(leaf.dtype, jnp.floating)}
    assert dtypes == {jnp.dtype(jnp.float32)}, dtypes
  # Activations are bfloat16: the logits come out in the compute dtype.
  variables = state_lib.model_variables(state16)
  logits, inter = model16.apply(variables, jnp.zeros((2, 8, 8, 3)), train=False,
                                capture_intermediates=True, mutable=["intermediates"])
  assert logits.dtype == jnp.bfloat16
  conv_out = inter["intermediates"]["conv1"]["__call__"][0]
  assert conv_out.dtype == jnp.bfloat16
  # The BN layer computes its statistics in float32 even from bfloat16 inputs.
  from prism_jax.models import bn_stats
  out = bn_stats.forward_with_bn_stats(model16, variables, jnp.ones((2, 8, 8, 3)))
  assert out.bn and all(s.batch_mean.dtype == jnp.float32 and s.batch_var.dtype == jnp.float32 for s in out.bn)


def test_squeeze_stage_with_bfloat16_policy_stores_float32_and_records_it(tmp_path):
  """The stage wiring: the policy reaches the model (bfloat16 compute), the stored teacher stays
  float32, and the non-default policy is part of the fingerprint (so a float32 rerun is refused)."""
  from recover_utils import write_tiny_arrays
  from prism_jax.io import artifacts, teacher_store
  from prism_jax.parallel import mesh as mesh_lib
  from prism_jax.stages import run_stage
  config = common.base_config()
  config.data = common.data_config(source="arrays", name="tiny", path=write_tiny_arrays(str(tmp_path / "data")))
  sq = config.squeeze
  sq.teachers, sq.width, sq.epochs, sq.batch_size, sq.eval_batch_size = ("resnet18",), 0.125, 1.0, 8, 8
  sq.warmup_epochs, sq.eval_every_epochs = 0.0, 0.0
  config.precision.squeeze.compute_dtype = "bfloat16"
  workdir = str(tmp_path / "work")
  mesh = mesh_lib.make_mesh(1)
  run_stage("squeeze", config, workdir, mesh)
  model, variables, meta = teacher_store.load_teacher(f"{workdir}/teachers/resnet18")
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}
  assert meta["fingerprint"]["precision"] == {"compute_dtype": "bfloat16", "matmul_precision": "default"}
  config.precision.squeeze.compute_dtype = "float32"
  with pytest.raises(artifacts.ArtifactError, match="precision"):
    run_stage("squeeze", config, workdir, mesh)
