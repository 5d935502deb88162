"""diffusers AutoencoderKL state_dict -> Flax variables of `vae.AutoencoderKL`, with an explicit key map.

`key_map(spec)` lists every layer as (torch module prefix, flax module path, kind); a kind expands
to the torch tensors it owns and how each converts:
  conv:   weight OIHW -> params/<path>/kernel HWIO; bias
  norm:   GroupNorm weight -> scale; bias
  linear: weight (out, in) -> kernel (in, out); bias
Older checkpoints name the mid-block attention `query` / `key` / `value` / `proj_attn` (diffusers
before 0.14, and conversions of the original LDM checkpoint store them as 1x1 convs of shape
(C, C, 1, 1) or (C, C, 1)); `canonical_state_dict` renames and squeezes those to the current layout
first. A state_dict in the original CompVis/LDM layout (`encoder.down.0.block.0...`) is detected
and refused with a message saying how to convert it.

Conversion is strict: a missing or unexpected key, or a shape that differs from what the model
expects, raises ValueError naming the key and both shapes. No torch import here (state_dicts are
name -> numpy array). `load_vae` reads a model directory written by `tools/import_vae` back.
"""

from __future__ import annotations

import re
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from prism_jax.diffusion import vae
from prism_jax.io import diffusion_store
from prism_jax.models import tree_paths

LayerMap = list[tuple[str, str, str]]  # (torch prefix, flax path 'a/b', kind)
_KIND_TENSORS = {"conv": (("weight", "kernel"), ("bias", "bias")),
                 "norm": (("weight", "scale"), ("bias", "bias")),
                 "linear": (("weight", "kernel"), ("bias", "bias"))}
_ATTENTION_PREFIXES = ("encoder.mid_block.attentions.0", "decoder.mid_block.attentions.0")
_LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LDM_KEY = re.compile(r"^(first_stage_model\.)?"
                      r"(encoder\.(down|mid)\.|decoder\.(up|mid)\.|(encoder|decoder)\.norm_out\.)")


def _resnet(torch_prefix: str, flax_path: str, in_channels: int, out_channels: int) -> LayerMap:
  layers = [(f"{torch_prefix}.norm1", f"{flax_path}/norm1", "norm"),
            (f"{torch_prefix}.conv1", f"{flax_path}/conv1", "conv"),
            (f"{torch_prefix}.norm2", f"{flax_path}/norm2", "norm"),
            (f"{torch_prefix}.conv2", f"{flax_path}/conv2", "conv")]
  if in_channels != out_channels:
    layers.append((f"{torch_prefix}.conv_shortcut", f"{flax_path}/conv_shortcut", "conv"))
  return layers


def _mid_block(torch_prefix: str, flax_path: str, channels: int) -> LayerMap:
  attention_t, attention_f = f"{torch_prefix}.attentions.0", f"{flax_path}/attentions_0"
  return (_resnet(f"{torch_prefix}.resnets.0", f"{flax_path}/resnets_0", channels, channels) +
          [(f"{attention_t}.group_norm", f"{attention_f}/group_norm", "norm"),
           (f"{attention_t}.to_q", f"{attention_f}/to_q", "linear"),
           (f"{attention_t}.to_k", f"{attention_f}/to_k", "linear"),
           (f"{attention_t}.to_v", f"{attention_f}/to_v", "linear"),
           (f"{attention_t}.to_out.0", f"{attention_f}/to_out", "linear")] +
          _resnet(f"{torch_prefix}.resnets.1", f"{flax_path}/resnets_1", channels, channels))


def key_map(spec: Mapping[str, Any]) -> LayerMap:
  """Every layer of the diffusers AutoencoderKL with `spec`, in the reference's module order."""
  model = vae.create_vae(spec)
  widths = tuple(model.block_out_channels)
  last = len(widths) - 1
  layers: LayerMap = [("encoder.conv_in", "encoder/conv_in", "conv")]
  channels = widths[0]
  for i, width in enumerate(widths):
    for j in range(model.layers_per_block):
      layers += _resnet(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder/down_blocks_{i}_resnets_{j}",
                        channels, width)
      channels = width
    if i != last:
      layers.append((f"encoder.down_blocks.{i}.downsamplers.0.conv",
                     f"encoder/down_blocks_{i}_downsampler/conv", "conv"))
  layers += _mid_block("encoder.mid_block", "encoder/mid_block", widths[-1])
  layers += [("encoder.conv_norm_out", "encoder/conv_norm_out", "norm"),
             ("encoder.conv_out", "encoder/conv_out", "conv"),
             ("quant_conv", "quant_conv", "conv"),
             ("post_quant_conv", "post_quant_conv", "conv"),
             ("decoder.conv_in", "decoder/conv_in", "conv")]
  layers += _mid_block("decoder.mid_block", "decoder/mid_block", widths[-1])
  channels = widths[-1]
  for i, width in enumerate(reversed(widths)):
    for j in range(model.layers_per_block + 1):
      layers += _resnet(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder/up_blocks_{i}_resnets_{j}",
                        channels, width)
      channels = width
    if i != last:
      layers.append((f"decoder.up_blocks.{i}.upsamplers.0.conv",
                     f"decoder/up_blocks_{i}_upsampler/conv", "conv"))
  return layers + [("decoder.conv_norm_out", "decoder/conv_norm_out", "norm"),
                   ("decoder.conv_out", "decoder/conv_out", "conv")]


def _entries(layers: LayerMap) -> Iterator[tuple[str, tuple[str, ...], str, str]]:
  """(torch key, flax variable path, kind, torch suffix) for every tensor of the map."""
  for torch_prefix, flax_path, kind in layers:
    for suffix, leaf in _KIND_TENSORS[kind]:
      yield f"{torch_prefix}.{suffix}", ("params",) + tuple(flax_path.split("/")) + (leaf,), kind, suffix


def _convert(tensor: np.ndarray, kind: str, suffix: str) -> np.ndarray:
  if suffix != "weight" or kind == "norm":
    return tensor
  if kind == "conv":
    return tensor.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  return tensor.T


def _torch_shape(kind: str, suffix: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The torch shape that converts to `flax_shape` (for checks and error messages)."""
  if suffix != "weight" or kind == "norm":
    return tuple(flax_shape)
  if kind == "conv":
    h, w, i, o = flax_shape
    return (o, i, h, w)
  return tuple(flax_shape[::-1])


def _spec_text(spec: Mapping[str, Any]) -> str:
  return ", ".join(f"{k}={tuple(v) if isinstance(v, list) else v}" for k, v in spec.items()
                   if k in ("block_out_channels", "layers_per_block", "latent_channels"))


def abstract_variables(model: vae.AutoencoderKL) -> Any:
  """The variables' ShapeDtypeStructs (nothing allocated), from an input of the smallest valid size."""
  side = model.downsampling_factor
  images = jnp.zeros((1, side, side, model.in_channels))
  return jax.eval_shape(lambda: model.init(jax.random.key(0), images))


def expected_state_dict_shapes(spec: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  """torch key -> shape of the diffusers AutoencoderKL that the Flax model with `spec` expects."""
  expected = tree_paths.flat_shapes(abstract_variables(vae.create_vae(spec)))
  return {key: _torch_shape(kind, suffix, expected[path])
          for key, path, kind, suffix in _entries(key_map(spec))}


def check_not_ldm_layout(state_dict: Mapping[str, Any]) -> None:
  for key in state_dict:
    if _LDM_KEY.match(key):
      raise ValueError(
          f"key '{key}' is in the original CompVis/LDM layout, not diffusers'; convert the checkpoint "
          "first (diffusers: AutoencoderKL.from_single_file(path).save_pretrained(dir)) and import "
          "the diffusion_pytorch_model.safetensors it writes")


def canonical_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Renames legacy attention keys (query/key/value/proj_attn) and squeezes 1x1-conv attention weights.

  Raises ValueError for an LDM-layout state_dict or when a legacy and a current name hold the same tensor.
  """
  check_not_ldm_layout(state_dict)
  canonical: dict[str, np.ndarray] = {}
  renamed_from: dict[str, str] = {}
  for key, value in state_dict.items():
    new_key = key
    for prefix in _ATTENTION_PREFIXES:
      if key.startswith(prefix + "."):
        layer, _, suffix = key[len(prefix) + 1:].rpartition(".")
        if layer in _LEGACY_ATTENTION_NAMES:
          new_key = f"{prefix}.{_LEGACY_ATTENTION_NAMES[layer]}.{suffix}"
    if new_key in canonical:
      first = renamed_from.get(new_key, new_key)
      raise ValueError(f"state_dict holds both '{first}' and '{key}' for '{new_key}'")
    tensor = np.asarray(value)
    is_attention_weight = (new_key.startswith(_ATTENTION_PREFIXES) and new_key.endswith(".weight")
                           and ".group_norm." not in new_key)
    if is_attention_weight and tensor.ndim > 2 and all(d == 1 for d in tensor.shape[2:]):
      tensor = tensor.reshape(tensor.shape[:2])  # a 1x1 conv is a linear layer
    canonical[new_key] = tensor
    if new_key != key:
      renamed_from[new_key] = key
  return canonical


def infer_vae_spec(state_dict: Mapping[str, Any], norm_num_groups: int = 32,
                   scaling_factor: float = 0.18215) -> dict[str, Any]:
  """The spec (constructor kwargs) of the model a diffusers AutoencoderKL state_dict holds.

  Widths, depth and channel counts come from the tensor shapes; the GroupNorm group count and the
  latent scaling factor are not visible in them (config.json holds them) and are passed in.
  """
  state_dict = canonical_state_dict(state_dict)

  def shape(key: str, what: str) -> tuple[int, ...]:
    if key not in state_dict:
      raise ValueError(f"state_dict has no key '{key}' ({what}); not a diffusers AutoencoderKL state_dict")
    return tuple(np.shape(state_dict[key]))

  in_shape = shape("encoder.conv_in.weight", "the encoder's input conv")
  num_blocks = _count_indices(state_dict, r"encoder\.down_blocks\.(\d+)\.")
  if num_blocks == 0:
    raise ValueError("state_dict has no 'encoder.down_blocks.*' keys; not a diffusers AutoencoderKL "
                     "state_dict")
  widths = tuple(shape(f"encoder.down_blocks.{i}.resnets.0.conv1.weight", f"down block {i}")[0]
                 for i in range(num_blocks))
  layers = _count_indices(state_dict, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")
  return dict(in_channels=int(in_shape[1]),
              out_channels=int(shape("decoder.conv_out.weight", "the decoder's output conv")[0]),
              block_out_channels=tuple(int(w) for w in widths), layers_per_block=int(layers),
              latent_channels=int(shape("post_quant_conv.weight", "the post-quantization conv")[0]),
              norm_num_groups=int(norm_num_groups), scaling_factor=float(scaling_factor))


def state_dict_to_variables(state_dict: Mapping[str, Any], spec: Mapping[str, Any]) -> dict[str, Any]:
  """Converts a diffusers AutoencoderKL `state_dict` (name -> numpy array) for the model with `spec`.

  Returns {'params': ...} as nested dicts of float32 numpy arrays.
  """
  state_dict = canonical_state_dict(state_dict)
  expected = tree_paths.flat_shapes(abstract_variables(vae.create_vae(spec)))
  where = f"the VAE with {_spec_text(spec)}"
  entries = list(_entries(key_map(spec)))
  variables: dict[str, Any] = {}
  for torch_key, path, kind, suffix in entries:
    if path not in expected:
      raise ValueError(f"VAE key map targets '{'/'.join(path)}', which the model lacks")
    tensor = tree_paths.take_tensor(state_dict, torch_key, _torch_shape(kind, suffix, expected[path]),
                                    missing_for=where, expected_by=where)
    tree_paths.set_path(variables, path, _convert(tensor, kind, suffix))
  mapped = {torch_key for torch_key, _, _, _ in entries}
  for key in state_dict:
    if key not in mapped:
      raise ValueError(f"unexpected state_dict key '{key}' (shape {tuple(np.shape(state_dict[key]))}) "
                       f"for {where}")
  unset = [path for path in expected if tree_paths.get_path(variables, path) is None]
  if unset:
    raise ValueError(f"VAE key map leaves '{'/'.join(unset[0])}' unset")
  return variables


def check_variables_match(model: vae.AutoencoderKL, variables: Mapping[str, Any],
                          source: str = "variables") -> None:
  """Raises ValueError naming the first key whose presence or shape differs from `model`'s."""
  tree_paths.check_shapes(abstract_variables(model), variables, source=source)


def load_vae(model_dir: str, dtype: Any = jnp.float32
             ) -> tuple[vae.AutoencoderKL, dict[str, Any], dict[str, Any]]:
  """(model, variables, meta) of a VAE model directory (written by `python -m prism_jax.tools.import_vae`).

  The checksum is verified by the store; every variable's shape is checked against the rebuilt model.
  """
  variables, meta = diffusion_store.load_variables(model_dir, kind="vae")
  model = vae.create_vae(meta["spec"], dtype=dtype)
  check_variables_match(model, variables, source=model_dir)
  return model, variables, meta


def _count_indices(state_dict: Mapping[str, Any], prefix_pattern: str) -> int:
  """1 + the largest index the (one-group) `prefix_pattern` captures at the start of a key; 0 if none."""
  pattern = re.compile(prefix_pattern)
  return 1 + max((int(m.group(1)) for m in map(pattern.match, state_dict) if m), default=-1)
