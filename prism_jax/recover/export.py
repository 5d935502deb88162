"""Recovery outputs (SPEC 4.4): lossless PNGs in an ImageFolder layout, one array file, a manifest.

Images are denormalized to [0, 1], scaled by 255 and *rounded* to uint8 (the official code
truncates and then saves JPEG-75; the optional JPEG export reproduces that for parity studies).
"""

from __future__ import annotations

import io
import json
import os
import re
from typing import Sequence

import numpy as np
from PIL import Image

from prism_jax.io import artifacts


def to_uint8(images_normalized: np.ndarray, mean: Sequence[float], std: Sequence[float],
             truncate: bool = False) -> np.ndarray:
  x = np.asarray(images_normalized, np.float32) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
  x = np.clip(x, 0.0, 1.0) * 255.0
  return (np.floor(x) if truncate else np.round(x)).astype(np.uint8)


def class_folder(index: int, name: str) -> str:
  safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_") or "class"
  return f"{index:04d}_{safe}"


def _encode(image: np.ndarray, fmt: str, **kwargs) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format=fmt, **kwargs)
  return buf.getvalue()


def write_outputs(out_dir: str, images_u8: np.ndarray, labels: np.ndarray, ipc_indices: np.ndarray,
                  class_names: Sequence[str], manifest: Sequence[dict], *, export_jpeg: bool = False,
                  jpeg_images_u8: np.ndarray | None = None) -> None:
  """Writes images/<class>/ipcNNNN.png, images.npz, manifest.jsonl and classes.json (atomically)."""
  for image, label, ipc in zip(images_u8, labels, ipc_indices):
    folder = os.path.join(out_dir, "images", class_folder(int(label), class_names[int(label)]))
    artifacts.write_bytes(os.path.join(folder, f"ipc{int(ipc):04d}.png"), _encode(image, "PNG"))
  if export_jpeg:
    for image, label, ipc in zip(jpeg_images_u8, labels, ipc_indices):
      folder = os.path.join(out_dir, "images_jpeg", class_folder(int(label), class_names[int(label)]))
      artifacts.write_bytes(os.path.join(folder, f"class{int(label):03d}_id{int(ipc):03d}.jpg"),
                            _encode(image, "JPEG", quality=75))
  artifacts.write_npz(os.path.join(out_dir, "images.npz"), images=images_u8,
                      labels=labels.astype(np.int32), ipc_index=ipc_indices.astype(np.int32),
                      class_names=np.asarray(list(class_names)))
  lines = "".join(json.dumps(artifacts.to_jsonable(m), sort_keys=True) + "\n" for m in manifest)
  artifacts.write_bytes(os.path.join(out_dir, "manifest.jsonl"), lines.encode())
  artifacts.write_json(os.path.join(out_dir, "classes.json"),
                       {"class_names": list(class_names),
                        "folders": [class_folder(i, n) for i, n in enumerate(class_names)]})
