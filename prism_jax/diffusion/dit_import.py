"""DiT checkpoints (official `DiT-XL-2-256x256.pt` or diffusers `DiTTransformer2DModel`) -> Flax variables.

Two explicit key maps, one per layout, list every layer as (torch module prefix, flax module path,
kind). A kind expands to the tensors it owns and how each is converted:
  conv            weight OIHW -> kernel HWIO; bias
  linear          weight (out, in) -> kernel (in, out); bias
  embedding       weight -> embedding (rows: num_classes classes, then the null class)
  qkv_q/_k/_v     a diffusers to_q / to_k / to_v linear -> its third (q, k, v order) of the output
                  columns of our fused qkv kernel and bias
  linear_copy,    diffusers keeps a copy of the timestep and label embedders in every block; only
  embedding_copy  block 0's is used for the final layer and the copies of the public (converted)
                  checkpoints are identical. These map to the same Flax variable as block 0's and
                  must equal it exactly: a checkpoint whose copies differ (trained per block) cannot
                  be represented by one shared embedder and is refused, naming the key.
  pos_embed       the official checkpoint's frozen position embedding: checked against our computed
                  one (2-D sin-cos) and otherwise ignored (diffusers does not store it)
Conversion is strict: a missing or unexpected state_dict key, or a shape that differs from what the
Flax model of the spec expects, raises ValueError naming the key and both shapes. No torch import
here: a state_dict is a mapping name -> numpy array.

The number of heads is not visible in the weights: it comes from an explicit argument, a diffusers
config.json (num_attention_heads), or the standard count of the known widths (DIT_SIZES). The
timestep embedding of both layouts defaults to the official one (`timestep_freq_shift=0`): the public
diffusers DiT files are converted official weights; pass 1 to reproduce diffusers' forward exactly.
"""

from __future__ import annotations

import re
from typing import Any, Iterator, Mapping

import jax.numpy as jnp
import numpy as np

from prism_jax.diffusion import dit as dit_lib
from prism_jax.models import tree_paths

LAYOUTS = ("official", "diffusers")
LayerMap = list[tuple[str, str, str]]  # (torch prefix, flax path 'a/b', kind)

_KIND_SUFFIXES = {"conv": ("weight", "bias"), "linear": ("weight", "bias"), "linear_copy": ("weight", "bias"),
                  "qkv_q": ("weight", "bias"), "qkv_k": ("weight", "bias"), "qkv_v": ("weight", "bias"),
                  "embedding": ("weight",), "embedding_copy": ("weight",), "pos_embed": ("",)}
_QKV_PART = {"qkv_q": 0, "qkv_k": 1, "qkv_v": 2}
_FLAX_LEAF = {"weight": "kernel", "bias": "bias"}
# Standard head count of each known width (the paper's sizes and our tiny one).
STANDARD_HEADS = {size["hidden_size"]: size["num_heads"] for size in dit_lib.DIT_SIZES.values()}
POS_EMBED_TOLERANCE = 1e-5


def official_key_map(depth: int) -> LayerMap:
  """The layers of facebookresearch/DiT's `DiT` state_dict."""
  layer_map = [("x_embedder.proj", "x_embedder", "conv"),
               ("pos_embed", "", "pos_embed"),
               ("t_embedder.mlp.0", "t_embedder/fc1", "linear"),
               ("t_embedder.mlp.2", "t_embedder/fc2", "linear"),
               ("y_embedder.embedding_table", "y_embedder", "embedding")]
  for i in range(depth):
    tp, fp = f"blocks.{i}", f"blocks_{i}"
    layer_map += [(f"{tp}.adaLN_modulation.1", f"{fp}/adaLN_modulation", "linear"),
                  (f"{tp}.attn.qkv", f"{fp}/attn/qkv", "linear"),
                  (f"{tp}.attn.proj", f"{fp}/attn/proj", "linear"),
                  (f"{tp}.mlp.fc1", f"{fp}/mlp/fc1", "linear"),
                  (f"{tp}.mlp.fc2", f"{fp}/mlp/fc2", "linear")]
  return layer_map + [("final_layer.adaLN_modulation.1", "final_layer/adaLN_modulation", "linear"),
                      ("final_layer.linear", "final_layer/linear", "linear")]


def diffusers_key_map(depth: int) -> LayerMap:
  """The layers of diffusers' `DiTTransformer2DModel` state_dict (ada_norm_zero, no affine norms)."""
  layer_map = [("pos_embed.proj", "x_embedder", "conv")]
  for i in range(depth):
    tp, fp = f"transformer_blocks.{i}", f"blocks_{i}"
    emb = f"{tp}.norm1.emb"
    linear_kind, embedding_kind = ("linear", "embedding") if i == 0 else ("linear_copy", "embedding_copy")
    layer_map += [(f"{emb}.timestep_embedder.linear_1", "t_embedder/fc1", linear_kind),
                  (f"{emb}.timestep_embedder.linear_2", "t_embedder/fc2", linear_kind),
                  (f"{emb}.class_embedder.embedding_table", "y_embedder", embedding_kind),
                  (f"{tp}.norm1.linear", f"{fp}/adaLN_modulation", "linear"),
                  (f"{tp}.attn1.to_q", f"{fp}/attn/qkv", "qkv_q"),
                  (f"{tp}.attn1.to_k", f"{fp}/attn/qkv", "qkv_k"),
                  (f"{tp}.attn1.to_v", f"{fp}/attn/qkv", "qkv_v"),
                  (f"{tp}.attn1.to_out.0", f"{fp}/attn/proj", "linear"),
                  (f"{tp}.ff.net.0.proj", f"{fp}/mlp/fc1", "linear"),
                  (f"{tp}.ff.net.2", f"{fp}/mlp/fc2", "linear")]
  return layer_map + [("proj_out_1", "final_layer/adaLN_modulation", "linear"),
                      ("proj_out_2", "final_layer/linear", "linear")]


KEY_MAPS = {"official": official_key_map, "diffusers": diffusers_key_map}
# Per layout: the keys that reveal the architecture (infer_dit_spec) and the block index pattern.
_LAYOUT_KEYS = {
    "official": dict(patch="x_embedder.proj.weight", labels="y_embedder.embedding_table.weight",
                     fc1="blocks.0.mlp.fc1.weight", final="final_layer.linear.weight",
                     block=re.compile(r"^blocks\.(\d+)\.")),
    "diffusers": dict(patch="pos_embed.proj.weight",
                      labels="transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight",
                      fc1="transformer_blocks.0.ff.net.0.proj.weight", final="proj_out_2.weight",
                      block=re.compile(r"^transformer_blocks\.(\d+)\.")),
}


def detect_layout(state_dict: Mapping[str, Any]) -> str:
  """'official' or 'diffusers', from the patch-embedding key; ValueError if neither (or both)."""
  found = [layout for layout in LAYOUTS if _LAYOUT_KEYS[layout]["patch"] in state_dict]
  if len(found) != 1:
    sample = ", ".join(sorted(state_dict)[:5]) or "no keys"
    raise ValueError(f"not a DiT state_dict: expected key 'x_embedder.proj.weight' (official DiT) or "
                     f"'pos_embed.proj.weight' (diffusers DiTTransformer2DModel), found {sample}")
  return found[0]


def _layout(state_dict: Mapping[str, Any], layout: str | None) -> str:
  if layout is None:
    return detect_layout(state_dict)
  if layout not in LAYOUTS:
    raise ValueError(f"layout={layout!r}: expected one of {LAYOUTS}")
  return layout


def _shape_of(state_dict: Mapping[str, Any], key: str, layout: str) -> tuple[int, ...]:
  if key not in state_dict:
    raise ValueError(f"state_dict is missing key '{key}' ({layout} DiT layout)")
  return tuple(int(d) for d in np.shape(state_dict[key]))


def infer_dit_spec(state_dict: Mapping[str, Any], layout: str | None = None, *, num_heads: int | None = None,
                   input_size: int | None = None, config: Mapping[str, Any] | None = None,
                   timestep_freq_shift: int = 0) -> dict[str, Any]:
  """The DiT spec (constructor kwargs) of a state_dict.

  depth, width, patch, channels, class count, mlp ratio and learn_sigma come from the weights;
  input_size from the official pos_embed, else `input_size`, else a diffusers `config`'s sample_size;
  num_heads from `num_heads`, else the config's num_attention_heads, else the standard count for the
  width. A given config is checked against the weights (a differing field raises ValueError).
  """
  layout = _layout(state_dict, layout)
  keys = _LAYOUT_KEYS[layout]
  hidden_size, in_channels, patch_size, patch_w = _shape_of(state_dict, keys["patch"], layout)
  if patch_size != patch_w:
    raise ValueError(f"state_dict key '{keys['patch']}' has a non-square patch {patch_size}x{patch_w}")
  label_rows = _shape_of(state_dict, keys["labels"], layout)[0]
  num_classes = label_rows - 1  # the last row is the null class
  mlp_hidden = _shape_of(state_dict, keys["fc1"], layout)[0]
  mlp_ratio = mlp_hidden / hidden_size
  if int(hidden_size * mlp_ratio) != mlp_hidden:
    raise ValueError(f"state_dict key '{keys['fc1']}': MLP width {mlp_hidden} is not a ratio of "
                     f"{hidden_size}")
  out_rows = _shape_of(state_dict, keys["final"], layout)[0]
  out_channels, rest = divmod(out_rows, patch_size * patch_size)
  if rest or out_channels not in (in_channels, 2 * in_channels):
    raise ValueError(f"state_dict key '{keys['final']}' has {out_rows} rows: expected patch_size**2 * "
                     f"{in_channels} or * {2 * in_channels} (in_channels, or twice with a learned sigma)")
  block_indices = {int(m.group(1)) for k in state_dict if (m := keys["block"].match(k))}
  if not block_indices:
    raise ValueError(f"state_dict has no transformer blocks ({layout} DiT layout)")
  depth = max(block_indices) + 1
  config = dict(config or {})

  stored_size = None
  if layout == "official":
    tokens = _shape_of(state_dict, "pos_embed", layout)[1]
    grid = int(round(np.sqrt(tokens)))
    if grid * grid != tokens:
      raise ValueError(f"state_dict key 'pos_embed' has {tokens} tokens, not a square grid")
    stored_size = grid * patch_size
  elif "sample_size" in config:
    stored_size = int(config["sample_size"])
  if input_size is None:
    if stored_size is None:
      raise ValueError("input_size cannot be inferred from a diffusers state_dict (its position embedding is "
                       "not stored): pass input_size, or the config.json with sample_size")
    input_size = stored_size
  elif stored_size is not None and int(input_size) != stored_size:
    raise ValueError(f"input_size={input_size} differs from the checkpoint's {stored_size}")

  if num_heads is None:
    num_heads = config.get("num_attention_heads", STANDARD_HEADS.get(hidden_size))
  if num_heads is None:
    raise ValueError(f"num_heads cannot be inferred for hidden_size={hidden_size} (not a standard DiT width "
                     f"{sorted(STANDARD_HEADS)}): pass it explicitly")
  num_heads = int(num_heads)
  if config:
    _check_diffusers_config(config, dict(
        num_layers=depth, in_channels=in_channels, patch_size=patch_size, num_embeds_ada_norm=num_classes,
        out_channels=out_channels), hidden_size, num_heads)
  return dit_lib.check_spec(dict(
      input_size=int(input_size), patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
      depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, num_classes=num_classes,
      learn_sigma=out_channels == 2 * in_channels, timestep_freq_shift=timestep_freq_shift))


def _check_diffusers_config(config: Mapping[str, Any], from_weights: Mapping[str, int], hidden_size: int,
                            num_heads: int) -> None:
  """A diffusers config.json must describe the DiT the weights hold (the variant we implement)."""
  for field, value in from_weights.items():
    if config.get(field) is not None and int(config[field]) != value:
      raise ValueError(f"config {field}={config[field]} differs from the weights ({value})")
  head_dim = config.get("attention_head_dim")
  if head_dim is not None and int(head_dim) * num_heads != hidden_size:
    raise ValueError(f"config attention_head_dim={head_dim} x num_heads={num_heads} != hidden size "
                     f"{hidden_size} of the weights")
  for field, supported in (("norm_type", "ada_norm_zero"), ("activation_fn", "gelu-approximate")):
    if config.get(field, supported) != supported:
      raise ValueError(f"config {field}={config[field]!r}: only {supported!r} (the DiT variant) is supported")
  if config.get("norm_elementwise_affine"):
    raise ValueError("config norm_elementwise_affine=true: DiT's LayerNorms have no affine parameters")


def _entries(layer_map: LayerMap) -> Iterator[tuple[str, tuple[str, ...] | None, str, str]]:
  """(torch key, flax variable path, kind, torch suffix) of every tensor of a key map."""
  for torch_prefix, flax_path, kind in layer_map:
    for suffix in _KIND_SUFFIXES[kind]:
      if kind == "pos_embed":
        yield torch_prefix, None, kind, suffix
        continue
      module = tuple(flax_path.split("/"))
      leaf = "embedding" if kind.startswith("embedding") else _FLAX_LEAF[suffix]
      yield f"{torch_prefix}.{suffix}", ("params",) + module + (leaf,), kind, suffix


def _torch_shape(kind: str, suffix: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The torch shape of the tensor that converts to (its part of) a Flax variable of `flax_shape`."""
  if kind in _QKV_PART:
    if suffix == "bias":
      return (flax_shape[0] // 3,)
    return (flax_shape[1] // 3, flax_shape[0])
  if suffix == "weight" and kind == "conv":
    h, w, i, o = flax_shape
    return (o, i, h, w)
  if suffix == "weight" and kind in ("linear", "linear_copy"):
    return tuple(flax_shape[::-1])
  return tuple(flax_shape)


def _convert(tensor: np.ndarray, kind: str, suffix: str) -> np.ndarray:
  if suffix != "weight" or kind.startswith("embedding"):
    return tensor
  if kind == "conv":
    return tensor.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  return tensor.T


def expected_state_dict_shapes(spec: Mapping[str, Any], layout: str) -> dict[str, tuple[int, ...]]:
  """torch key -> shape that a checkpoint of `layout` for the DiT of `spec` must hold."""
  if layout not in LAYOUTS:
    raise ValueError(f"layout={layout!r}: expected one of {LAYOUTS}")
  model = dit_lib.create_dit(spec)
  expected = tree_paths.flat_shapes(dit_lib.abstract_variables(model))
  shapes = {}
  for torch_key, path, kind, suffix in _entries(KEY_MAPS[layout](model.depth)):
    if kind == "pos_embed":
      shapes[torch_key] = (1, model.grid_size ** 2, model.hidden_size)
    else:
      shapes[torch_key] = _torch_shape(kind, suffix, expected[path])
  return shapes


def state_dict_to_variables(state_dict: Mapping[str, Any], spec: Mapping[str, Any],
                            layout: str | None = None) -> dict[str, Any]:
  """Converts a DiT state_dict (name -> numpy array) of `layout` (default: detected) for `spec`.

  Returns {'params': ...} as nested dicts of float32 numpy arrays.
  """
  layout = _layout(state_dict, layout)
  model = dit_lib.create_dit(spec)
  expected = tree_paths.flat_shapes(dit_lib.abstract_variables(model))
  where = f"the {layout}-layout DiT of spec depth={model.depth}, hidden_size={model.hidden_size}, " \
          f"patch_size={model.patch_size}"
  flat: dict[tuple[str, ...], np.ndarray] = {}
  consumed = set()
  for torch_key, path, kind, suffix in _entries(KEY_MAPS[layout](model.depth)):
    if kind == "pos_embed":
      want = (1, model.grid_size ** 2, model.hidden_size)
    else:
      if path not in expected:
        raise ValueError(f"key map ({layout}) targets '{'/'.join(path)}', which the model lacks")
      want = _torch_shape(kind, suffix, expected[path])
    tensor = tree_paths.take_tensor(state_dict, torch_key, want, missing_for=where, expected_by=where)
    consumed.add(torch_key)
    if kind == "pos_embed":
      _check_pos_embed(tensor, model)
      continue
    value = _convert(tensor, kind, suffix)
    if kind in _QKV_PART:
      fused = flat.setdefault(path, np.zeros(expected[path], np.float32))
      part, width = _QKV_PART[kind], model.hidden_size
      fused[..., part * width:(part + 1) * width] = value
    elif kind.endswith("_copy"):
      diff = float(np.max(np.abs(value - flat[path])))
      if diff != 0.0:
        raise ValueError(f"state_dict key '{torch_key}' differs from block 0's copy (max abs diff "
                         f"{diff:.3g}): this DiT shares one timestep/label embedder across blocks, as the "
                         "official model")
    else:
      flat[path] = value
  for key in state_dict:
    if key not in consumed:
      raise ValueError(f"unexpected state_dict key '{key}' (shape {tuple(np.shape(state_dict[key]))}) "
                       f"for {where}")
  for path in expected:
    if path not in flat:
      raise ValueError(f"key map ({layout}) leaves '{'/'.join(path)}' unset")
  variables: dict[str, Any] = {}
  for path, value in flat.items():
    tree_paths.set_path(variables, path, value)
  return variables


def _check_pos_embed(tensor: np.ndarray, model: dit_lib.DiT) -> None:
  computed = dit_lib.sincos_pos_embed_2d(model.hidden_size, model.grid_size)
  diff = float(np.max(np.abs(tensor[0] - computed)))
  if not diff <= POS_EMBED_TOLERANCE:
    raise ValueError(f"state_dict key 'pos_embed' differs from the fixed 2-D sin-cos position embedding "
                     f"(max abs diff {diff:.3g}); a learned position embedding is not supported")


def check_variables(model: dit_lib.DiT, variables: Mapping[str, Any], source: str = "variables") -> None:
  """Raises ValueError naming the first key whose presence or shape differs from `model`'s variables."""
  tree_paths.check_shapes(dit_lib.abstract_variables(model), variables, source=source,
                          expected_by="the model of the spec")


def load_dit(model_dir: str, dtype: Any = jnp.float32) -> tuple[dit_lib.DiT, dict[str, Any], dict[str, Any]]:
  """(model, variables, meta) of a diffusion_store 'dit' directory; the variables (numpy arrays) are
  checked against the model rebuilt from the stored spec. `dtype` is the compute dtype."""
  from prism_jax.io import artifacts, diffusion_store

  variables, meta = diffusion_store.load_variables(model_dir, kind="dit")
  try:
    model = dit_lib.create_dit(meta["spec"], dtype=dtype)
  except ValueError as err:
    raise artifacts.ArtifactError(f"{model_dir}: {err}") from None
  try:
    check_variables(model, variables, source=model_dir)
  except ValueError as err:
    raise artifacts.ArtifactError(f"{err} (variables do not fit the stored spec {meta['spec']})") from None
  return model, variables, meta
