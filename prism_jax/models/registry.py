"""Name -> teacher/student module. Every model has the same constructor and call signature:

  model = create_model(name, num_classes=10, stem='small', width=0.25)
  variables = model.init({'params': k1, 'dropout': k2}, x, train=False)
  logits = model.apply(variables, x, train=False)
  logits, updates = model.apply(variables, x, train=True, mutable=['batch_stats'],
                                rngs={'dropout': k})
  logits, features = model.apply(variables, x, train=False, return_features=True)
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prism_jax import errors
from prism_jax.models import alexnet, efficientnet, mobilenet_v2, resnet, shufflenet_v2


def _resnet(arch: str) -> Callable[..., nn.Module]:
  return lambda **kw: resnet.ResNet(arch=arch, **kw)


def _shufflenet(arch: str) -> Callable[..., nn.Module]:
  return lambda **kw: shufflenet_v2.ShuffleNetV2(arch=arch, **kw)


_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": _resnet("resnet18"),
    "resnet34": _resnet("resnet34"),
    "resnet50": _resnet("resnet50"),
    "resnet101": _resnet("resnet101"),
    "mobilenet_v2": lambda **kw: mobilenet_v2.MobileNetV2(**kw),
    "shufflenet_v2_x0_5": _shufflenet("shufflenet_v2_x0_5"),
    "shufflenet_v2_x1_0": _shufflenet("shufflenet_v2_x1_0"),
    "efficientnet_b0": lambda **kw: efficientnet.EfficientNetB0(**kw),
    "alexnet": lambda **kw: alexnet.AlexNet(**kw),
}


ZOO = tuple(_FACTORIES)  # the built-in architectures (registered models come on top)


def register_model(name: str, factory: Callable[..., nn.Module]) -> None:
  """Adds a model to the registry (custom teachers/students; tests register tiny ones).

  `factory(num_classes=..., stem=..., width=..., dtype=...)` must return a Linen module with the
  zoo's call signature (`train`, `return_features`) whose BatchNorm layers are `layers.BatchNorm`.
  """
  if name in _FACTORIES:
    raise ValueError(f"model name {name!r} is already registered")
  _FACTORIES[name] = factory


def available_models() -> tuple[str, ...]:
  return tuple(_FACTORIES)


def create_model(name: str, *, num_classes: int, stem: str = "imagenet", width: float = 1.0,
                 dtype: Any = jnp.float32) -> nn.Module:
  """Builds a zoo model; `stem` is 'imagenet' (torchvision) or 'small' (32-64 px inputs)."""
  if name not in _FACTORIES:
    raise errors.ConfigError(f"unknown model name {name!r}; known models: {', '.join(_FACTORIES)}")
  if stem not in ("imagenet", "small"):
    raise errors.ConfigError(f"stem must be 'imagenet' or 'small', got {stem!r}")
  if not width > 0:
    raise errors.ConfigError(f"width must be > 0, got {width}")
  if int(num_classes) < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}")
  return _FACTORIES[name](num_classes=int(num_classes), stem=stem, width=float(width), dtype=dtype)


def random_variables(model: nn.Module, image_shape: tuple[int, ...], seed: int = 0) -> dict:
  """Random variables with `model`'s exact tree, filled on the host with numpy (no XLA compile).

  For tests and benchmarks: jitted `model.init` compiles one RNG computation per tensor, which takes
  tens of seconds on CPU for the deeper models. Kernels ~ N(0, 1/fan_in) (variance-preserving),
  BN scale 1 and running var 1, biases and running means 0. Not a training initializer.
  """
  abstract = jax.eval_shape(
      lambda: model.init({"params": jax.random.key(0), "dropout": jax.random.key(0)},
                         jnp.zeros(tuple(image_shape), jnp.float32), train=False))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)
    value = 1.0 if name in ("scale", "var") else 0.0
    return np.full(leaf.shape, value, np.float32)

  return jax.tree_util.tree_map_with_path(fill, abstract)
