"""Import a diffusers AutoencoderKL (e.g. stabilityai/sd-vae-ft-mse) as a prism_jax VAE model directory.

  python -m prism_jax.tools.import_vae --weights sd-vae-ft-mse/diffusion_pytorch_model.safetensors \
      --out workdir/vae/sd-vae-ft-mse

--weights is a `diffusion_pytorch_model.safetensors`, a `.bin` state_dict, or a diffusers `vae/`
directory holding one of them (a pipeline directory with a `vae/` folder works too). The config.json
of that directory (or next to the file) gives the scaling factor and the GroupNorm group count, which
the tensor shapes do not show; the widths, depth and channel counts are read from the shapes and
checked against it. Users fetch the files themselves: nothing downloads here.

The conversion is strict (`prism_jax.diffusion.vae_import`): a missing, unexpected or mis-shaped
tensor stops with its name. Any failure prints one line `import_vae: <file>: <reason>` and exits 1.
safetensors files are read with `safetensors.numpy`; torch is imported only to read a `.bin`.
float16 / bfloat16 weights are stored as their float32 values.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Mapping, Sequence

import numpy as np

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
# config.json fields that must match what the shapes say, and those with no port (checked for defaults).
_SHAPE_FIELDS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels")
_UNSUPPORTED_DEFAULTS = dict(shift_factor=None, latents_mean=None, latents_std=None, use_quant_conv=True,
                             use_post_quant_conv=True, mid_block_add_attention=True, act_fn="silu")


class WeightsError(ValueError):
  """A failure tied to one file (the one the message names)."""

  def __init__(self, path: str, reason: str):
    super().__init__(reason)
    self.path = path


def resolve_weights(path: str) -> tuple[str, str | None]:
  """(weights file, config.json or None) for a weights file, a `vae/` directory or a pipeline directory."""
  if os.path.isdir(path):
    for directory in (path, os.path.join(path, "vae")):
      for name in WEIGHT_FILES:
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate):
          config = os.path.join(directory, "config.json")
          return candidate, config if os.path.isfile(config) else None
    raise WeightsError(path, f"directory holds none of {', '.join(WEIGHT_FILES)} "
                             "(nor a vae/ folder with one)")
  if not os.path.isfile(path):
    raise WeightsError(path, "no such file or directory")
  config = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
  return path, config if os.path.isfile(config) else None


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """A safetensors or torch `.bin` state_dict as numpy arrays; any read failure -> WeightsError."""
  if path.endswith(".safetensors"):
    import ml_dtypes  # noqa: F401  (a JAX dependency; registers numpy's bfloat16 for bf16 files)
    from safetensors.numpy import load_file  # Conversion-only dependency.
    try:
      return dict(load_file(path))
    except Exception as err:  # safetensors raises its own error types for bad headers and short files.
      raise WeightsError(path, f"not a readable safetensors file ({type(err).__name__}: {err})") from None
  if path.endswith(TORCH_SUFFIXES):
    import torch  # Conversion-only dependency: the only torch import outside tests.
    try:
      obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types (EOFError, UnpicklingError, ...).
      raise WeightsError(path, f"not a readable torch state_dict ({type(err).__name__}: {err})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
      obj = obj["state_dict"]
    if not isinstance(obj, dict):
      raise WeightsError(path, f"expected a state_dict (dict of tensors), got {type(obj).__name__}")
    return {k: v.detach().cpu().float().numpy() for k, v in obj.items() if hasattr(v, "detach")}
  raise WeightsError(path, "unknown weights format; expected .safetensors or one of "
                           f"{', '.join(TORCH_SUFFIXES)}")


def read_config(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      config = json.load(f)
  except (OSError, json.JSONDecodeError) as err:
    raise WeightsError(path, f"unreadable config ({err})") from None
  if not isinstance(config, dict):
    raise WeightsError(path, "config.json is not a JSON object")
  if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
    raise WeightsError(path, f"describes a {config['_class_name']}, not an AutoencoderKL")
  for field, block_type in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
    other = sorted(set(config.get(field, ())) - {block_type})
    if other:
      raise WeightsError(path, f"{field} has {other}; the port has only {block_type}")
  for field, default in _UNSUPPORTED_DEFAULTS.items():
    if field in config and config[field] != default:
      raise WeightsError(path, f"{field}={config[field]!r} is not supported "
                               f"(the port has {field}={default!r})")
  return config


def spec_from(state_dict: Mapping[str, np.ndarray], config: Mapping[str, Any] | None,
              config_path: str | None, scaling_factor: float | None,
              norm_num_groups: int | None) -> dict[str, Any]:
  """The model spec: shapes from the weights, groups and scale from the flags, else config.json."""
  from prism_jax.diffusion import vae_import

  config = config or {}
  spec = vae_import.infer_vae_spec(
      state_dict,
      norm_num_groups=config.get("norm_num_groups", 32) if norm_num_groups is None else norm_num_groups,
      scaling_factor=config.get("scaling_factor", 0.18215) if scaling_factor is None else scaling_factor)
  for field in _SHAPE_FIELDS:
    if field in config:
      stated = tuple(config[field]) if isinstance(config[field], list) else config[field]
      if stated != spec[field]:
        raise WeightsError(config_path, f"{field}={stated} but the weights have {field}={spec[field]}")
  return spec


def import_vae(weights: str, out_dir: str, scaling_factor: float | None = None,
               norm_num_groups: int | None = None) -> dict[str, Any]:
  """Converts `weights` and writes a VAE model directory at `out_dir`; returns the spec."""
  from prism_jax.diffusion import vae_import
  from prism_jax.io import diffusion_store

  weights_file, config_path = resolve_weights(weights)
  config = read_config(config_path) if config_path else None
  state_dict = load_state_dict(weights_file)
  try:
    spec = spec_from(state_dict, config, config_path, scaling_factor, norm_num_groups)
    variables = vae_import.state_dict_to_variables(state_dict, spec)
  except WeightsError:
    raise
  except ValueError as err:
    raise WeightsError(weights_file, str(err)) from None
  diffusion_store.save_model(out_dir, kind="vae", variables=variables, spec=spec,
                             source=dict(weights=os.path.abspath(weights_file),
                                         config=os.path.abspath(config_path) if config_path else None))
  return spec


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--weights", required=True,
                      help="diffusion_pytorch_model.safetensors / .bin, or a diffusers vae/ directory")
  parser.add_argument("--out", required=True, help="model directory to write")
  parser.add_argument("--scaling-factor", type=float, default=None,
                      help="latent scaling factor (default: config.json's, else 0.18215)")
  parser.add_argument("--norm-num-groups", type=int, default=None,
                      help="GroupNorm groups (default: config.json's, else 32)")
  args = parser.parse_args(argv)
  try:
    spec = import_vae(args.weights, args.out, args.scaling_factor, args.norm_num_groups)
  except WeightsError as err:
    print(f"import_vae: {err.path}: {err}", file=sys.stderr)
    return 1
  except (ValueError, OSError) as err:  # e.g. the output directory cannot be written
    print(f"import_vae: {args.weights}: {err}", file=sys.stderr)
    return 1
  widths = "x".join(str(w) for w in spec["block_out_channels"])
  print(f"wrote VAE (widths {widths}, {spec['layers_per_block']} layers per block, "
        f"{spec['latent_channels']} latent channels, scale {spec['scaling_factor']}) to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
