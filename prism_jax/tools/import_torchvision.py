"""Import torchvision ImageNet weights as a prism_jax teacher.

  python -m prism_jax.tools.import_torchvision --arch resnet18 --pth resnet18-f37072fd.pth \
      --out workdir/teachers/resnet18 [--num-classes 1000] [--class-names names.txt]

A 1000-class head gets the ImageNet-1K synset ids (n01440764, ...) as class names, the names the
`tfds` imagenet2012 and ImageFolder sources produce, so the class-order check passes.

Loads the .pth with torch (the only place outside tests that imports torch), converts it with the
explicit key map of `prism_jax.models.torchvision_import` (strict: any missing, unexpected or
mis-shaped tensor stops with its name), and writes a teacher directory via `io.teacher_store`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

import numpy as np

from prism_jax.models import torchvision_import


def load_pth_state_dict(path: str) -> dict[str, np.ndarray]:
  """A .pth state_dict (or a {'state_dict': ...} / {'model': ...} wrapper) as numpy arrays."""
  import torch  # Conversion-only dependency.

  obj: Any = torch.load(path, map_location="cpu", weights_only=True)
  for wrapper_key in ("state_dict", "model"):
    if isinstance(obj, dict) and isinstance(obj.get(wrapper_key), dict):
      obj = obj[wrapper_key]
  if not isinstance(obj, dict):
    raise ValueError(f"{path}: expected a state_dict (dict of tensors), got {type(obj).__name__}")
  return {k: v.detach().cpu().float().numpy() for k, v in obj.items() if hasattr(v, "detach")}


def imagenet_class_names() -> tuple[str, ...]:
  """The 1000 ImageNet-1K synset ids in torchvision's (= TFDS imagenet2012's = sorted folder) order.

  Read from the label file that ships with tensorflow-datasets (no download), so imported teachers
  carry the class names the `tfds` and `imagenetfolder` data sources produce.
  """
  import importlib.util
  spec = importlib.util.find_spec("tensorflow_datasets")  # finds the package without importing it
  if spec is None or not spec.submodule_search_locations:
    raise ValueError("the ImageNet-1K class names are read from tensorflow-datasets, which is not installed: "
                     "pass --class-names FILE (one synset id per line, in torchvision's order)")
  labels = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "imagenet2012", "labels.txt")
  with open(labels) as f:
    text = f.read()
  names = tuple(line.strip() for line in text.splitlines() if line.strip())
  if len(names) != 1000:
    raise ValueError(f"tensorflow_datasets imagenet2012 labels.txt lists {len(names)} classes, expected 1000")
  return names


def read_class_names(path: str) -> tuple[str, ...]:
  with open(path) as f:
    return tuple(line.strip() for line in f if line.strip())


def import_teacher(arch: str, pth: str, out_dir: str, num_classes: int | None = None,
                   class_names: Sequence[str] | None = None) -> dict:
  state_dict = load_pth_state_dict(pth)
  variables = torchvision_import.torchvision_state_dict_to_variables(arch, state_dict, num_classes)
  num_classes = int(np.shape(_final_bias(variables, arch))[0])
  if class_names is None:
    class_names = imagenet_class_names() if num_classes == 1000 else tuple(str(i) for i in range(num_classes))
  if len(class_names) != num_classes:
    raise ValueError(f"--class-names lists {len(class_names)} classes, the classifier has {num_classes}")
  from prism_jax.io import teacher_store  # Lead-owned writer of teacher directories.

  teacher_store.save_teacher(
      out_dir, name=arch, variables=variables,
      model_config=dict(name=arch, num_classes=num_classes, stem="imagenet", width=1.0),
      class_names=tuple(class_names), dataset="imagenet2012" if num_classes == 1000 else "custom",
      test_accuracy=None)
  return variables


def _final_bias(variables: dict, arch: str):
  flax_path = torchvision_import.KEY_MAPS[arch](arch)[-1][1]
  node = variables["params"]
  for part in flax_path.split("/"):
    node = node[part]
  return node["bias"]


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--arch", required=True, choices=sorted(torchvision_import.KEY_MAPS))
  parser.add_argument("--pth", required=True, help="torchvision state_dict file (.pth)")
  parser.add_argument("--out", required=True, help="teacher directory to write")
  parser.add_argument("--num-classes", type=int, default=None,
                      help="expected class count (default: rows of the final classifier)")
  parser.add_argument("--class-names", default="",
                      help="file with one class name per line (default: ImageNet-1K synset ids for 1000 "
                           "classes, else 0..N-1); must match the data's class order")
  args = parser.parse_args(argv)
  try:
    names = read_class_names(args.class_names) if args.class_names else None
    import_teacher(args.arch, args.pth, args.out, args.num_classes, names)
  except ValueError as err:
    print(f"import_torchvision: {args.pth}: {err}", file=sys.stderr)
    return 1
  print(f"wrote {args.arch} teacher to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
