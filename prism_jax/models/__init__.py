"""Teacher/student zoo (Flax Linen ports of torchvision CNNs), BN statistics and weight import.

API:
  models.create_model(name, num_classes=..., stem='imagenet'|'small', width=1.0, dtype=float32)
  models.available_models() -> tuple of names
  models.register_model(name, factory) adds a custom architecture
  model.apply(variables, x, train=False)                         -> logits
  model.apply(variables, x, train=False, return_features=True)   -> (logits, features)
      features: the pooled penultimate vector fed to the final classifier, float32 (B, D).
  model.apply(variables, x, train=True, mutable=['batch_stats'], rngs={'dropout': k})
      -> (logits, {'batch_stats': ...}); alexnet has no batch_stats.
  models.forward_with_bn_stats(model, variables, images) -> TeacherOutput(logits, features, bn)
      eval mode; bn holds one BNStat per BatchNorm layer in forward order (SPEC 2.2).
  models.random_variables(model, image_shape, seed) -> host-filled variables (tests, benchmarks)
Inputs are NHWC float32 images normalized with the dataset mean/std.
"""

from prism_jax.models.bn_stats import BNStat, TeacherOutput, forward_with_bn_stats
from prism_jax.models.registry import available_models, create_model, random_variables, register_model

__all__ = ["BNStat", "TeacherOutput", "available_models", "create_model", "forward_with_bn_stats",
           "random_variables", "register_model"]
