"""torchvision state_dict -> Flax variables of the matching port, with an explicit key map.

Each architecture has a function listing its layers as (torch module prefix, flax module path,
kind). A kind expands to the torch tensors it owns and how each is converted:
  conv:    weight OIHW -> params/<path>/kernel HWIO (plus bias when the conv has one)
  bn:      weight/bias -> params scale/bias; running_mean/var -> batch_stats mean/var;
           num_batches_tracked is ignored
  linear:  weight (out, in) -> kernel (in, out); bias
  linear_chw: as linear, with the rows of the kernel permuted from torch's NCHW flatten order to
           our NHWC (H, W, C) order (AlexNet's first classifier layer)
Conversion is strict: a missing or unexpected state_dict key, or a shape that differs from what the
Flax model expects, raises ValueError naming the key and both shapes. No torch import here: the
state_dict is a mapping name -> numpy array.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from prism_jax.models import alexnet, efficientnet, mobilenet_v2, registry, resnet, shufflenet_v2, tree_paths

LayerMap = list[tuple[str, str, str]]  # (torch prefix, flax path 'a/b', kind)
_KIND_SUFFIXES = {"conv": ("weight",), "conv_bias": ("weight", "bias"),
                  "bn": ("weight", "bias", "running_mean", "running_var"),
                  "linear": ("weight", "bias"), "linear_chw": ("weight", "bias")}
_BN_TARGETS = {"weight": ("params", "scale"), "bias": ("params", "bias"),
               "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


def _conv_bn(torch_prefix: str, flax_path: str, conv_index: int = 0) -> LayerMap:
  """A torchvision Conv2dNormActivation ('.0' conv, '.1' BN) -> our ConvBN ('conv', 'bn')."""
  return [(f"{torch_prefix}.{conv_index}", f"{flax_path}/conv", "conv"),
          (f"{torch_prefix}.{conv_index + 1}", f"{flax_path}/bn", "bn")]


def resnet_map(arch: str) -> LayerMap:
  kind, stage_sizes = resnet.LAYOUTS[arch]
  expansion = resnet.EXPANSION[kind]
  convs = 2 if kind == "basic" else 3
  layer_map = [("conv1", "conv1", "conv"), ("bn1", "bn1", "bn")]
  in_channels = 64
  for stage, num_blocks in enumerate(stage_sizes):
    out_channels = resnet.STAGE_PLANES[stage] * expansion
    for index in range(num_blocks):
      tp, fp = f"layer{stage + 1}.{index}", f"layer{stage + 1}_{index}"
      for i in range(1, convs + 1):
        layer_map += [(f"{tp}.conv{i}", f"{fp}/conv{i}", "conv"),
                      (f"{tp}.bn{i}", f"{fp}/bn{i}", "bn")]
      if index == 0 and (stage > 0 or in_channels != out_channels):
        layer_map += [(f"{tp}.downsample.0", f"{fp}/downsample_conv", "conv"),
                      (f"{tp}.downsample.1", f"{fp}/downsample_bn", "bn")]
      in_channels = out_channels
  return layer_map + [("fc", "fc", "linear")]


def mobilenet_v2_map(arch: str) -> LayerMap:
  del arch
  layer_map = _conv_bn("features.0", "features_0")
  configs = mobilenet_v2.block_configs(1.0, "imagenet")
  for index, (_, _, _, expand_ratio) in enumerate(configs, start=1):
    tp, fp = f"features.{index}.conv", f"features_{index}"
    sub = 0
    if expand_ratio != 1:
      layer_map += _conv_bn(f"{tp}.0", f"{fp}/expand")
      sub = 1
    layer_map += _conv_bn(f"{tp}.{sub}", f"{fp}/depthwise")
    layer_map += _conv_bn(tp, f"{fp}/project", conv_index=sub + 1)  # pw-linear: bare conv + BN
  layer_map += _conv_bn(f"features.{len(configs) + 1}", f"features_{len(configs) + 1}")
  return layer_map + [("classifier.1", "classifier", "linear")]


def shufflenet_v2_map(arch: str) -> LayerMap:
  layer_map = _conv_bn("conv1", "conv1")
  for stage, repeats in enumerate(shufflenet_v2.STAGE_REPEATS, start=2):
    for index in range(repeats):
      tp, fp = f"stage{stage}.{index}", f"stage{stage}_{index}"
      if index == 0:  # stride 2: branch1 = dw conv, BN, 1x1 conv, BN, ReLU
        layer_map += _conv_bn(f"{tp}.branch1", f"{fp}/branch1_depthwise", 0)
        layer_map += _conv_bn(f"{tp}.branch1", f"{fp}/branch1_pointwise", 2)
      # branch2 = 1x1 conv, BN, ReLU, dw conv, BN, 1x1 conv, BN, ReLU
      layer_map += _conv_bn(f"{tp}.branch2", f"{fp}/branch2_pointwise1", 0)
      layer_map += _conv_bn(f"{tp}.branch2", f"{fp}/branch2_depthwise", 3)
      layer_map += _conv_bn(f"{tp}.branch2", f"{fp}/branch2_pointwise2", 5)
  layer_map += _conv_bn("conv5", "conv5")
  return layer_map + [("fc", "fc", "linear")]


def efficientnet_map(arch: str) -> LayerMap:
  del arch
  layer_map = _conv_bn("features.0", "features_0")
  stages = efficientnet.block_configs(1.0, "imagenet")
  for stage, blocks in enumerate(stages, start=1):
    for index, config in enumerate(blocks):
      tp, fp = f"features.{stage}.{index}.block", f"features_{stage}_{index}"
      sub = 0
      if config["expand_ratio"] != 1:
        layer_map += _conv_bn(f"{tp}.0", f"{fp}/expand")
        sub = 1
      layer_map += _conv_bn(f"{tp}.{sub}", f"{fp}/depthwise")
      layer_map += [(f"{tp}.{sub + 1}.fc1", f"{fp}/se/fc1", "conv_bias"),
                    (f"{tp}.{sub + 1}.fc2", f"{fp}/se/fc2", "conv_bias")]
      layer_map += _conv_bn(f"{tp}.{sub + 2}", f"{fp}/project")
  layer_map += _conv_bn(f"features.{len(stages) + 1}", f"features_{len(stages) + 1}")
  return layer_map + [("classifier.1", "classifier", "linear")]


def alexnet_map(arch: str) -> LayerMap:
  del arch
  convs = [(f"features.{i}", f"conv{n}", "conv_bias") for n, i in enumerate((0, 3, 6, 8, 10), 1)]
  return convs + [("classifier.1", "fc1", "linear_chw"), ("classifier.4", "fc2", "linear"),
                  ("classifier.6", "fc3", "linear")]


KEY_MAPS = {
    "resnet18": resnet_map, "resnet34": resnet_map, "resnet50": resnet_map,
    "resnet101": resnet_map, "mobilenet_v2": mobilenet_v2_map,
    "shufflenet_v2_x0_5": shufflenet_v2_map, "shufflenet_v2_x1_0": shufflenet_v2_map,
    "efficientnet_b0": efficientnet_map, "alexnet": alexnet_map,
}


def _entries(layer_map: LayerMap) -> Iterator[tuple[str, tuple[str, ...], str, str]]:
  """(torch key, flax variable path, kind, torch suffix) for every tensor of the map."""
  for torch_prefix, flax_path, kind in layer_map:
    parts = tuple(flax_path.split("/"))
    for suffix in _KIND_SUFFIXES[kind]:
      if kind == "bn":
        collection, leaf = _BN_TARGETS[suffix]
        path = (collection,) + parts + (leaf,)
      else:
        path = ("params",) + parts + ("kernel" if suffix == "weight" else "bias",)
      yield f"{torch_prefix}.{suffix}", path, kind, suffix


def _convert(tensor: np.ndarray, kind: str, suffix: str) -> np.ndarray:
  if suffix != "weight" or kind == "bn":
    return tensor
  if kind in ("conv", "conv_bias"):
    return tensor.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  if kind == "linear_chw":
    # Rows of the Flax kernel are in (H, W, C) order; torch flattens (C, H, W).
    out_features, in_features = tensor.shape
    channels = alexnet.CONV_CHANNELS[-1]
    side = alexnet.pooled_size("imagenet")
    return tensor.reshape(out_features, channels, side, side).transpose(2, 3, 1, 0).reshape(
        in_features, out_features)
  return tensor.T


def _torch_shape(kind: str, suffix: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The torch shape that converts to `flax_shape` (for error messages and checks)."""
  if suffix != "weight" or kind == "bn":
    return tuple(flax_shape)
  if kind in ("conv", "conv_bias"):
    h, w, i, o = flax_shape
    return (o, i, h, w)
  return tuple(flax_shape[::-1])


def _infer_num_classes(arch: str, state_dict: Mapping[str, Any]) -> int:
  last_prefix = KEY_MAPS[arch](arch)[-1][0]
  key = f"{last_prefix}.weight"
  if key not in state_dict:
    raise ValueError(f"state_dict has no key '{key}' (the final classifier of {arch})")
  return int(np.shape(state_dict[key])[0])


def expected_state_dict_shapes(arch: str, num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
  """torch key -> shape that the port of `arch` expects (num_batches_tracked excluded)."""
  model = registry.create_model(arch, num_classes=num_classes, stem="imagenet", width=1.0)
  expected = tree_paths.flat_shapes(expected_variables(model, (1, 224, 224, 3)))
  return {key: _torch_shape(kind, suffix, expected[path])
          for key, path, kind, suffix in _entries(KEY_MAPS[arch](arch))}


def torchvision_state_dict_to_variables(arch: str, state_dict: Mapping[str, Any],
                                        num_classes: int | None = None) -> dict[str, Any]:
  """Converts a torchvision `state_dict` (name -> numpy array) for `arch` (imagenet stem, width 1).

  `num_classes` defaults to the row count of the final classifier's weight.
  Returns {'params': ..., 'batch_stats': ...} as nested dicts of float32 numpy arrays
  (alexnet: {'params': ...} only).
  """
  if arch not in KEY_MAPS:
    raise ValueError(f"no torchvision key map for {arch!r}; known: {', '.join(KEY_MAPS)}")
  if num_classes is None:
    num_classes = _infer_num_classes(arch, state_dict)
  model = registry.create_model(arch, num_classes=num_classes, stem="imagenet", width=1.0)
  expected = tree_paths.flat_shapes(expected_variables(model, (1, 224, 224, 3)))

  variables: dict[str, Any] = {}
  consumed = set()
  for torch_key, path, kind, suffix in _entries(KEY_MAPS[arch](arch)):
    if path not in expected:
      raise ValueError(f"key map of {arch} targets '{'/'.join(path)}', which the model lacks")
    tensor = tree_paths.take_tensor(state_dict, torch_key, _torch_shape(kind, suffix, expected[path]),
                                    missing_for=arch, expected_by=f"{arch} with num_classes={num_classes}")
    tree_paths.set_path(variables, path, _convert(tensor, kind, suffix))
    consumed.add(torch_key)
  for key in state_dict:
    if key not in consumed and not key.endswith("num_batches_tracked"):
      raise ValueError(f"unexpected state_dict key '{key}' "
                       f"(shape {tuple(np.shape(state_dict[key]))}) for {arch}")
  missing = [p for p in expected if tree_paths.get_path(variables, p) is None]
  if missing:
    raise ValueError(f"key map of {arch} leaves '{'/'.join(missing[0])}' unset")
  return variables


def check_variables_match(model, variables: Mapping[str, Any], x_shape=(1, 32, 32, 3),
                          source: str = "variables") -> None:
  """Raises ValueError naming the first key whose presence or shape differs from `model`'s."""
  tree_paths.check_shapes(expected_variables(model, x_shape), variables, source=source)


def expected_variables(model, x_shape) -> Any:
  """`model`'s variables tree as shapes (jax.eval_shape of its initializer on a batch `x_shape`)."""
  return jax.eval_shape(
      lambda: model.init({"params": jax.random.key(0), "dropout": jax.random.key(0)},
                         jnp.zeros(tuple(x_shape), jnp.float32), train=False))
