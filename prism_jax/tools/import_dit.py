"""Import a pretrained DiT (official .pt or diffusers safetensors) as a prism_jax diffusion model directory.

  python -m prism_jax.tools.import_dit --pth DiT-XL-2-256x256.pt --out workdir/dit_xl2_256
  python -m prism_jax.tools.import_dit --safetensors DiT-XL-2-256/transformer --out workdir/dit_xl2_256
      [--num-heads N] [--input-size N] [--class-names names.txt] [--timestep-embedding official|diffusers]

--pth reads an official state_dict with torch.load(weights_only=True) (torch is the conversion-only
dependency, imported only here); a train.py checkpoint's 'ema' weights are taken, else 'model'.
--safetensors takes diffusers' `transformer/diffusion_pytorch_model.safetensors` or its `transformer/`
directory; a config.json beside it supplies num_attention_heads and sample_size and is checked against
the weights. The layout is detected from the keys and converted with the strict key maps of
`prism_jax.diffusion.dit_import`. A 1000-class model gets the ImageNet-1K synset ids as class names
(the order of the `tfds` / ImageFolder sources), others '0'..'N-1' unless --class-names is given.
Any failure prints one line `import_dit: <file>: <reason>` and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zipfile
from typing import Any, Mapping, Sequence

import numpy as np

from prism_jax.diffusion import dit_import
from prism_jax.tools import import_torchvision  # class-name helpers shared with the teachers

SAFETENSORS_FILE = "diffusion_pytorch_model.safetensors"
CONFIG_FILE = "config.json"
TIMESTEP_EMBEDDINGS = {"official": 0, "diffusers": 1}  # -> the spec's timestep_freq_shift


def _one_line(err: BaseException) -> str:
  text = str(err).strip().splitlines()
  return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def load_pth_state_dict(path: str) -> dict[str, np.ndarray]:
  """An official DiT .pt (a state_dict, or a train.py checkpoint: its 'ema', else 'model') as numpy arrays."""
  import torch  # Conversion-only dependency.

  if not os.path.isfile(path):
    raise ValueError("no such file")
  try:
    obj: Any = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as err:  # torch raises many types for a corrupt file (pickle, zip, runtime errors).
    # torch's own message for a non-archive suggests weights_only=False, which is not the problem.
    reason = ("not a torch zip archive (truncated, or another format)" if not zipfile.is_zipfile(path)
              else _one_line(err))
    raise ValueError(f"cannot read a torch state_dict: {reason}") from None
  for wrapper_key in ("ema", "model", "state_dict"):
    if isinstance(obj, dict) and isinstance(obj.get(wrapper_key), dict):
      obj = obj[wrapper_key]
      break
  if not isinstance(obj, dict):
    raise ValueError(f"expected a state_dict (dict of tensors), got {type(obj).__name__}")
  state_dict = {}
  for key, value in obj.items():
    if not isinstance(value, torch.Tensor):
      raise ValueError(f"state_dict entry '{key}' is a {type(value).__name__}, not a tensor")
    state_dict[key] = value.detach().cpu().float().numpy()
  return state_dict


def resolve_safetensors(path: str) -> tuple[str, str | None]:
  """(weights file, config.json beside it or None) for a safetensors file or a diffusers transformer/ dir."""
  weights = os.path.join(path, SAFETENSORS_FILE) if os.path.isdir(path) else path
  config = os.path.join(os.path.dirname(weights), CONFIG_FILE)
  return weights, config if os.path.isfile(config) else None


def load_safetensors_state_dict(path: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file  # Conversion-only dependency.

  if not os.path.isfile(path):
    raise ValueError("no such file")
  try:
    tensors = load_file(path)
  except Exception as err:  # SafetensorError, OSError, or a dtype numpy cannot hold (bfloat16).
    raise ValueError(f"cannot read a safetensors file ({_one_line(err)})") from None
  return {key: np.asarray(value, np.float32) for key, value in tensors.items()}


def read_config(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      config = json.load(f)
  except (OSError, json.JSONDecodeError) as err:
    raise ValueError(f"{path}: cannot read the diffusers config ({_one_line(err)})") from None
  if not isinstance(config, dict):
    raise ValueError(f"{path}: expected a JSON object")
  return config


def default_class_names(num_classes: int) -> tuple[str, ...]:
  if num_classes == 1000:
    return import_torchvision.imagenet_class_names()  # ImageNet-1K synset ids, as the teachers'.
  return tuple(str(i) for i in range(num_classes))


def import_dit(state_dict: Mapping[str, np.ndarray], out_dir: str, *, source: Mapping[str, Any],
               config: Mapping[str, Any] | None = None, num_heads: int | None = None,
               input_size: int | None = None, class_names: Sequence[str] | None = None,
               timestep_embedding: str = "official") -> dict[str, Any]:
  """Converts `state_dict`, writes a 'dit' diffusion_store directory and returns the spec."""
  layout = dit_import.detect_layout(state_dict)
  spec = dit_import.infer_dit_spec(state_dict, layout, num_heads=num_heads, input_size=input_size,
                                   config=config, timestep_freq_shift=TIMESTEP_EMBEDDINGS[timestep_embedding])
  variables = dit_import.state_dict_to_variables(state_dict, spec, layout)
  names = tuple(class_names) if class_names is not None else default_class_names(spec["num_classes"])
  if len(names) != spec["num_classes"]:
    raise ValueError(f"--class-names lists {len(names)} classes, the model has {spec['num_classes']}")
  from prism_jax.io import diffusion_store

  diffusion_store.save_model(out_dir, kind="dit", variables=variables, spec=spec, class_names=names,
                             source=dict(source, layout=layout))
  return spec


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  weights = parser.add_mutually_exclusive_group(required=True)
  weights.add_argument("--pth", help="official DiT state_dict (.pt), e.g. DiT-XL-2-256x256.pt")
  weights.add_argument("--safetensors", help="diffusers transformer/diffusion_pytorch_model.safetensors or "
                                             "the transformer/ directory")
  parser.add_argument("--out", required=True, help="model directory to write")
  parser.add_argument("--num-heads", type=int, default=None,
                      help="attention heads (default: config.json, else the standard count of the width)")
  parser.add_argument("--input-size", type=int, default=None,
                      help="latent/pixel side (default: the official pos_embed or config.json sample_size)")
  parser.add_argument("--class-names", default="",
                      help="file with one class name per line (default: ImageNet-1K synset ids for 1000 "
                           "classes, else 0..N-1); must match the data's class order")
  parser.add_argument("--timestep-embedding", choices=sorted(TIMESTEP_EMBEDDINGS), default="official",
                      help="'official' (the embedding DiT was trained with) or 'diffusers' (its "
                           "downscale_freq_shift=1 variant, to reproduce diffusers' outputs exactly)")
  args = parser.parse_args(argv)
  file = args.pth or args.safetensors
  try:
    config = None
    if args.pth:
      state_dict = load_pth_state_dict(args.pth)
      source = dict(file=os.path.abspath(args.pth), format="pth")
    else:
      file, config_path = resolve_safetensors(args.safetensors)
      state_dict = load_safetensors_state_dict(file)
      config = read_config(config_path) if config_path else None
      source = dict(file=os.path.abspath(file), format="safetensors", config=config_path)
    names = import_torchvision.read_class_names(args.class_names) if args.class_names else None
    spec = import_dit(state_dict, args.out, source=source, config=config, num_heads=args.num_heads,
                      input_size=args.input_size, class_names=names,
                      timestep_embedding=args.timestep_embedding)
  except (ValueError, OSError) as err:
    print(f"import_dit: {file}: {' '.join(str(err).split())}", file=sys.stderr)
    return 1
  print(f"wrote DiT (depth {spec['depth']}, width {spec['hidden_size']}, patch {spec['patch_size']}, "
        f"{spec['num_classes']} classes) to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
