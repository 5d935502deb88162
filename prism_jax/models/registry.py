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
import jax.numpy as jnp

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


def available_models() -> tuple[str, ...]:
  return tuple(_FACTORIES)


def create_model(name: str, *, num_classes: int, stem: str = "imagenet", width: float = 1.0,
                 dtype: Any = jnp.float32) -> nn.Module:
  """Builds a zoo model; `stem` is 'imagenet' (torchvision) or 'small' (32-64 px inputs)."""
  if name not in _FACTORIES:
    raise ValueError(f"unknown model name {name!r}; known models: {', '.join(_FACTORIES)}")
  if stem not in ("imagenet", "small"):
    raise ValueError(f"stem must be 'imagenet' or 'small', got {stem!r}")
  if not width > 0:
    raise ValueError(f"width must be > 0, got {width}")
  if int(num_classes) < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}")
  return _FACTORIES[name](num_classes=int(num_classes), stem=stem, width=float(width), dtype=dtype)
