"""Data parallelism on 8 simulated CPU devices: batch sharding and step equivalence."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prism_jax.models import layers
from prism_jax.data import pipeline
from prism_jax.parallel import mesh as mesh_lib
from prism_jax.stages import squeeze
from prism_jax.train import optim, state as state_lib, steps


class ArrayDataset:
  """Minimal in-memory dataset with the interface the pipeline uses."""

  name = "toy"

  def __init__(self, n=40, size=8, num_classes=4):
    rng = np.random.default_rng(0)
    self.images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    self._labels = (np.arange(n) % num_classes).astype(np.int32)

  def num_examples(self, split):
    return len(self._labels)

  def labels(self, split):
    return self._labels

  def read(self, split, indices):
    return self.images[np.asarray(indices)]


def test_eight_devices_are_simulated():
  assert jax.device_count() == 8


def test_global_batch_is_split_over_devices():
  mesh = mesh_lib.make_mesh()
  rows = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  arr = mesh_lib.put_global_batch(rows[mesh_lib.local_batch_slice(16, mesh)], 16, mesh)
  assert arr.shape == (16, 3)
  shards = sorted(arr.addressable_shards, key=lambda s: s.index[0].start)
  assert len(shards) == 8
  for i, shard in enumerate(shards):
    assert shard.data.shape == (2, 3)
    np.testing.assert_array_equal(np.asarray(shard.data), rows[2 * i:2 * i + 2])
  with pytest.raises(ValueError, match="not divisible by the 8 devices"):
    mesh_lib.local_batch_slice(12, mesh)


def test_train_batches_are_a_deterministic_function_of_the_step():
  ds = ArrayDataset(n=40)
  mesh = mesh_lib.make_mesh()
  batches = pipeline.TrainBatches(ds, "train", 16, seed=3, mesh=mesh)
  assert batches.steps_per_epoch == 2  # 40 // 16, remainder dropped
  epoch0 = np.concatenate([batches.indices(0), batches.indices(1)])
  assert len(set(epoch0.tolist())) == 32  # no repeats inside an epoch
  assert not np.array_equal(batches.indices(0), batches.indices(2))  # a new order each epoch
  images, labels = batches.get(1)
  np.testing.assert_array_equal(np.asarray(images), ds.images[batches.indices(1)])
  np.testing.assert_array_equal(np.asarray(labels), ds._labels[batches.indices(1)])
  again = pipeline.TrainBatches(ds, "train", 16, seed=3, mesh=mesh_lib.make_mesh(1))
  np.testing.assert_array_equal(np.asarray(again.get(1)[0]), np.asarray(images))
  batches.close(); again.close()


def test_eval_batches_pad_and_mask():
  ds = ArrayDataset(n=20)
  mesh = mesh_lib.make_mesh()
  out = list(pipeline.eval_batches(ds, "test", 16, mesh))
  assert len(out) == 2
  masks = np.concatenate([np.asarray(m) for _, _, m in out])
  assert masks.sum() == 20 and masks[:20].all() and not masks[20:].any()
  labels = np.concatenate([np.asarray(l) for _, l, _ in out])[:20]
  np.testing.assert_array_equal(labels, ds._labels)


class SmallCNN(nn.Module):
  """conv-BN-relu x2 + pooled dense: the zoo's BatchNorm, compiled in seconds."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i, features in enumerate((8, 16)):
      x = layers.conv(features, 3, stride=1 + i, name=f"conv{i}")(x)
      x = nn.relu(layers.BatchNorm(name=f"bn{i}")(x, train))
    return nn.Dense(4, name="fc")(jnp.mean(x, axis=(1, 2)))


def _run_steps(mesh, augment, num_steps=2):
  model = SmallCNN()
  tx = optim.make_optimizer("sgd", optax.constant_schedule(0.05), weight_decay=5e-4)
  rep, data = mesh_lib.replicated(mesh), mesh_lib.data_sharding(mesh)
  state = jax.jit(functools.partial(state_lib.create_train_state, model, tx, image_shape=(8, 8, 3)),
                  out_shardings=rep)(jax.random.key(0))
  step = jax.jit(functools.partial(steps.classification_train_step, mean=(0.5,) * 3, std=(0.25,) * 3,
                                   augment=augment),
                 in_shardings=(rep, data, data, rep), out_shardings=(rep, rep))
  ds = ArrayDataset(n=32)
  for i in range(num_steps):
    idx = np.arange(16) + 16 * (i % 2)
    images = mesh_lib.put_global_batch(ds.images[idx][mesh_lib.local_batch_slice(16, mesh)], 16, mesh)
    labels = mesh_lib.put_global_batch(ds._labels[idx][mesh_lib.local_batch_slice(16, mesh)], 16, mesh)
    state, metrics = step(state, images, labels, jax.random.fold_in(jax.random.key(1), i))
  return jax.device_get(state), jax.device_get(metrics)


@pytest.mark.parametrize("augment", [None, "crop_flip"])
def test_data_parallel_step_equals_single_device_step(augment):
  aug_fn = squeeze.make_augment(augment, 8) if augment else None
  state8, metrics8 = _run_steps(mesh_lib.make_mesh(8), aug_fn)
  state1, metrics1 = _run_steps(mesh_lib.make_mesh(1), aug_fn)
  np.testing.assert_allclose(metrics8["loss"], metrics1["loss"], rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves((state8.params, state8.batch_stats)),
                  jax.tree_util.tree_leaves((state1.params, state1.batch_stats))):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
  # BN running statistics moved away from their init (mean 0): updated from the global batch.
  means = [x for p, x in jax.tree_util.tree_flatten_with_path(state8.batch_stats)[0] if "mean" in str(p[-1])]
  assert max(float(np.abs(m).max()) for m in means) > 1e-3
