"""Pure, jittable training and evaluation steps for supervised (hard-label) classification.

Steps take uint8 images and normalize on device (a quarter of the host-to-device bytes of
float32). Per-example augmentation keys are `fold_in(step_key, global_row)`, so an example's
augmentation depends only on the seed, the step and its position in the global batch — never on
how the batch is split over devices.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from prism_jax.data import stats
from prism_jax.train.state import TrainState

AugmentFn = Callable[[jax.Array, jax.Array], jax.Array]  # (image01 HWC, key) -> image01 HWC


def example_keys(step_key: jax.Array, batch_size: int) -> jax.Array:
  return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(jnp.arange(batch_size))


def classification_train_step(state: TrainState, images_u8: jax.Array, labels: jax.Array,
                              step_key: jax.Array, *, mean: Sequence[float], std: Sequence[float],
                              augment: AugmentFn | None = None, label_smoothing: float = 0.0):
  """One SGD/AdamW step with cross-entropy; BN statistics over the whole (global) batch."""
  batch_size = images_u8.shape[0]
  x = images_u8.astype(jnp.float32) / 255.0
  if augment is not None:
    x = jax.vmap(augment)(x, example_keys(jax.random.fold_in(step_key, 0), batch_size))
  x = stats.normalize(x, mean, std)

  def loss_fn(params):
    variables = {"params": params}
    mutable = []
    if state.batch_stats:
      variables["batch_stats"] = state.batch_stats
      mutable = ["batch_stats"]
    logits, updates = state.apply_fn(variables, x, train=True, mutable=mutable,
                                     rngs={"dropout": jax.random.fold_in(step_key, 1)})
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()
    return loss, (logits, updates)

  (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", state.batch_stats))
  metrics = {
      "loss": loss,
      "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
      "grad_norm": optax.tree.norm(grads),
  }
  return new_state, metrics


def classification_eval_step(state: TrainState, images_u8: jax.Array, labels: jax.Array,
                             mask: jax.Array, *, mean: Sequence[float], std: Sequence[float]):
  """Sums of correct predictions (top-1, top-5), loss and count over the unmasked rows."""
  x = stats.normalize(images_u8, mean, std)
  variables = {"params": state.params}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  logits = state.apply_fn(variables, x, train=False).astype(jnp.float32)
  mask = mask.astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  top1 = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  k = min(5, logits.shape[-1])
  topk = jnp.any(jax.lax.top_k(logits, k)[1] == labels[:, None], axis=-1).astype(jnp.float32)
  return {"correct": jnp.sum(top1 * mask), "correct_top5": jnp.sum(topk * mask),
          "loss_sum": jnp.sum(loss * mask), "count": jnp.sum(mask)}
