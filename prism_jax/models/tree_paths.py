"""Nested variable trees addressed by key paths: what the weight converters (torchvision, DiT, VAE)
share to fill Flax variables from a flat state_dict and to compare them with what a model expects."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np


def flat_shapes(tree: Mapping[str, Any]) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{('params', 'layer', 'kernel'): shape, ...} of every leaf."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(dict(tree))[0]:
    flat[tuple(str(getattr(p, "key", p)) for p in path)] = tuple(np.shape(leaf))
  return flat


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
  """tree[path[0]][path[1]]... = value, creating the intermediate dicts."""
  for part in path[:-1]:
    tree = tree.setdefault(part, {})
  tree[path[-1]] = value


def get_path(tree: Mapping, path: tuple[str, ...]):
  """tree[path[0]][path[1]]..., or None where a part is missing."""
  for part in path:
    if not isinstance(tree, Mapping) or part not in tree:
      return None
    tree = tree[part]
  return tree


def check_shapes(expected: Mapping[str, Any], got: Mapping[str, Any], *, source: str,
                 expected_by: str = "the model") -> None:
  """Raises ValueError naming the first key of `got` that is missing, mis-shaped or unexpected
  against `expected` (a variables tree, or its jax.eval_shape)."""
  check_flat_shapes(flat_shapes(expected), got, source=source, expected_by=expected_by)


def check_flat_shapes(expected_shapes: Mapping[tuple[str, ...], tuple[int, ...]], got: Mapping[str, Any], *,
                      source: str, expected_by: str = "the model") -> None:
  """`check_shapes` against expected shapes already flattened by `flat_shapes`."""
  got_shapes = flat_shapes(got)
  for path, shape in expected_shapes.items():
    name = "/".join(path)
    if path not in got_shapes:
      raise ValueError(f"{source}: missing key '{name}' (expected shape {shape})")
    if got_shapes[path] != shape:
      raise ValueError(f"{source}: key '{name}' has shape {got_shapes[path]}, {expected_by} expects {shape}")
  for path, shape in got_shapes.items():
    if path not in expected_shapes:
      raise ValueError(f"{source}: unexpected key '{'/'.join(path)}' (shape {shape}), not in the model")


def take_tensor(state_dict: Mapping[str, Any], key: str, want: tuple[int, ...], *, missing_for: str,
                expected_by: str) -> np.ndarray:
  """state_dict[key] as float32 with shape `want`; else ValueError naming the key and both shapes."""
  if key not in state_dict:
    raise ValueError(f"state_dict is missing key '{key}' (expected shape {want}) for {missing_for}")
  tensor = np.asarray(state_dict[key], dtype=np.float32)
  if tuple(tensor.shape) != want:
    raise ValueError(f"state_dict key '{key}' has shape {tuple(tensor.shape)}, {expected_by} expects {want}")
  return tensor
