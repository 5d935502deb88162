"""Recovery outputs (SPEC 4.4): lossless PNGs in an ImageFolder layout, one array file, a manifest.

Images are denormalized to [0, 1], scaled by 255 and *rounded* to uint8 (the official code
truncates and then saves JPEG-75; the optional JPEG export reproduces that for parity studies).
"""

from __future__ import annotations

import concurrent.futures
import functools
import io
import json
import os
import re
from typing import Sequence

import numpy as np
from PIL import Image

from prism_jax.io import artifacts, fs

# Image files are encoded and written by a thread pool: one file at a time, an ImageNet IPC 50 set
# (50,000 PNGs) would wait on 50,000 fsyncs or, on gs://, 50,000 sequential uploads. PNG's zlib and
# the file writes release the GIL.
LOCAL_WRITERS, REMOTE_WRITERS = min(8, os.cpu_count() or 1), 32


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
  def folder(kind: str, label) -> str:
    return os.path.join(out_dir, kind, class_folder(int(label), class_names[int(label)]))
  # (path, encode) per image file; the pool runs both the encoding and the write.
  files = [(os.path.join(folder("images", label), f"ipc{int(ipc):04d}.png"), functools.partial(_encode, image, "PNG"))
           for image, label, ipc in zip(images_u8, labels, ipc_indices)]
  if export_jpeg:
    files += [(os.path.join(folder("images_jpeg", label), f"class{int(label):03d}_id{int(ipc):03d}.jpg"),
               functools.partial(_encode, image, "JPEG", quality=75))
              for image, label, ipc in zip(jpeg_images_u8, labels, ipc_indices)]
  workers = REMOTE_WRITERS if fs.is_remote(out_dir) else LOCAL_WRITERS
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    # list(): the first failed write raises here, after the pool has finished the others.
    list(pool.map(lambda file: artifacts.write_bytes(file[0], file[1]()), files))
  artifacts.write_npz(os.path.join(out_dir, "images.npz"), images=images_u8,
                      labels=labels.astype(np.int32), ipc_index=ipc_indices.astype(np.int32),
                      class_names=np.asarray(list(class_names)))
  lines = "".join(json.dumps(artifacts.to_jsonable(m), sort_keys=True) + "\n" for m in manifest)
  artifacts.write_bytes(os.path.join(out_dir, "manifest.jsonl"), lines.encode())
  artifacts.write_json(os.path.join(out_dir, "classes.json"),
                       {"class_names": list(class_names),
                        "folders": [class_folder(i, n) for i, n in enumerate(class_names)]})
