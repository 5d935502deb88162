"""Pictures for the report (SPEC 8): an image grid per method (paper Fig. 5) and a UMAP of features
coloured by class (paper Fig. 1). Both are written atomically as PNG files.

Grid layout (pixels), which tests rely on: a header row of HEADER_HEIGHT with the method names, a left
column of LABEL_WIDTH with the class names, tiles of `tile` px (the image upscaled by an integer
nearest-neighbour factor to at least MIN_TILE px), TILE_GAP between tiles of one method, GROUP_GAP
between methods, and MARGIN around everything.
"""

from __future__ import annotations

import io
import math
import sys
import warnings
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from prism_jax.io import artifacts

MIN_TILE = 64
LABEL_WIDTH = 96
HEADER_HEIGHT = 18
TILE_GAP = 2
GROUP_GAP = 12
MARGIN = 4
BACKGROUND = (255, 255, 255)
TEXT_COLOR = (0, 0, 0)
MAX_LEGEND_CLASSES = 20


def upscale_factor(height: int, width: int) -> int:
  """Smallest integer factor that makes the image's longer side at least MIN_TILE px."""
  return max(1, math.ceil(MIN_TILE / max(height, width)))


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, max_width: int) -> str:
  """`text`, cut and ended with '..' if it is wider than `max_width` px."""
  if draw.textlength(text, font=font) <= max_width:
    return text
  while text and draw.textlength(text + "..", font=font) > max_width:
    text = text[:-1]
  return text + ".."


def _png_bytes(image: Image.Image) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format="PNG")
  return buf.getvalue()


def image_grid(sets: Mapping[str, tuple[np.ndarray, np.ndarray]], class_names: Sequence[str], path: str,
               per_class: int = 4, max_classes: int = 10) -> str:
  """Writes one PNG: a row per class, per method a block of its first `per_class` images of that class.

  `sets` maps method name -> (uint8 images (N, H, W, 3), labels (N,)), in column order; every method's
  images must have the same height and width. Classes 0 .. min(len(class_names), max_classes) - 1 are
  shown; a method with fewer images of a class leaves the remaining cells blank. Returns `path`.
  """
  if not sets:
    raise ValueError("image_grid got no image sets: expected at least one method -> (images, labels)")
  if per_class < 1 or max_classes < 1:
    raise ValueError(f"per_class={per_class} and max_classes={max_classes}: expected both >= 1")
  checked = {}
  for method, (images, labels) in sets.items():
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
      raise ValueError(f"image set {method!r}: images have shape {images.shape} and dtype {images.dtype}; "
                       "expected uint8 (N, H, W, 3)")
    if labels.shape != images.shape[:1]:
      raise ValueError(f"image set {method!r}: labels have shape {labels.shape}; expected "
                       f"({images.shape[0]},), one per image")
    checked[method] = (images, labels)
  sizes = {method: images.shape[1:3] for method, (images, _) in checked.items()}
  if len(set(sizes.values())) != 1:
    raise ValueError(f"image sets have different image sizes {sizes}: expected one (H, W) for all methods")
  height, width = next(iter(sizes.values()))
  factor = upscale_factor(height, width)
  tile_h, tile_w = height * factor, width * factor
  num_rows = min(len(class_names), max_classes)
  block_w = per_class * tile_w + (per_class - 1) * TILE_GAP
  canvas_w = 2 * MARGIN + LABEL_WIDTH + len(checked) * block_w + (len(checked) - 1) * GROUP_GAP
  canvas_h = 2 * MARGIN + HEADER_HEIGHT + num_rows * tile_h + max(num_rows - 1, 0) * TILE_GAP
  canvas = Image.new("RGB", (canvas_w, canvas_h), BACKGROUND)
  draw = ImageDraw.Draw(canvas)
  font = ImageFont.load_default()
  for col, (method, (images, labels)) in enumerate(checked.items()):
    left = MARGIN + LABEL_WIDTH + col * (block_w + GROUP_GAP)
    draw.text((left, MARGIN), _fit_text(draw, str(method), font, block_w), fill=TEXT_COLOR, font=font)
    for row in range(num_rows):
      top = MARGIN + HEADER_HEIGHT + row * (tile_h + TILE_GAP)
      for k, index in enumerate(np.flatnonzero(labels == row)[:per_class]):
        tile = np.repeat(np.repeat(images[index], factor, axis=0), factor, axis=1)
        canvas.paste(Image.fromarray(tile), (left + k * (tile_w + TILE_GAP), top))
  for row in range(num_rows):
    top = MARGIN + HEADER_HEIGHT + row * (tile_h + TILE_GAP)
    name = _fit_text(draw, str(class_names[row]), font, LABEL_WIDTH - 4)
    draw.text((MARGIN, top + tile_h // 2), name, fill=TEXT_COLOR, font=font, anchor="lm")
  artifacts.write_bytes(path, _png_bytes(canvas))
  return path


def _import_umap():
  """Imports umap-learn without its optional ParametricUMAP, which imports TensorFlow and Keras.

  That import costs seconds and, with torch installed and TensorFlow loaded first, Keras' torch
  import crashes the process (segmentation fault). Marking the submodule absent makes umap's own
  `except ImportError` fallback skip it; nothing here uses ParametricUMAP.
  """
  if "umap" not in sys.modules:
    sys.modules.setdefault("umap.parametric_umap", None)  # type: ignore[assignment]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", ImportWarning)
    import umap  # pylint: disable=import-outside-toplevel
  return umap


def embed_2d(features: np.ndarray, seed: int = 0, metric: str = "euclidean") -> np.ndarray:
  """2-D UMAP embedding (N, 2) float32; below 4 points UMAP's graph is degenerate, so PCA is used."""
  features = np.asarray(features, np.float32)
  if features.ndim != 2 or features.shape[0] == 0:
    raise ValueError(f"features have shape {features.shape}: expected (N, D) with N >= 1")
  num_points = features.shape[0]
  if num_points < 4:
    centered = features - features.mean(axis=0)
    _, _, vt = np.linalg.svd(centered, full_matrices=False)
    out = np.zeros((num_points, 2), np.float32)
    projected = centered @ vt[:2].T
    out[:, :projected.shape[1]] = projected
    return out
  umap = _import_umap()
  reducer = umap.UMAP(n_neighbors=min(15, num_points - 1), n_components=2, metric=metric,
                      random_state=seed, n_jobs=1)
  return np.asarray(reducer.fit_transform(features), np.float32)


def umap_plot(features: np.ndarray, labels: np.ndarray, class_names: Sequence[str], path: str,
              seed: int = 0, title: str = "", metric: str = "euclidean") -> np.ndarray:
  """Writes a PNG scatter of a 2-D UMAP of `features` coloured by class; returns the embedding (N, 2).

  Uses matplotlib's object API (a Figure with the Agg canvas, no pyplot), so it needs no display and
  leaves no global figure state. The legend names classes when there are at most MAX_LEGEND_CLASSES.
  """
  labels = np.asarray(labels)
  if labels.shape != (np.shape(features)[0],):
    raise ValueError(f"labels have shape {labels.shape}: expected ({np.shape(features)[0]},), one per "
                     "feature row")
  if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
    raise ValueError(f"labels range over [{labels.min()}, {labels.max()}]: expected indices into the "
                     f"{len(class_names)} class_names")
  embedding = embed_2d(features, seed=seed, metric=metric)
  from matplotlib import colormaps  # pylint: disable=import-outside-toplevel
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  present = np.unique(labels)
  num_classes = len(class_names)
  cmap = colormaps["tab10" if num_classes <= 10 else "tab20" if num_classes <= 20 else "turbo"]
  fig = Figure(figsize=(6.4, 5.6), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for c in present:
    color = cmap(int(c) % cmap.N if num_classes <= 20 else int(c) / max(num_classes - 1, 1))
    points = embedding[labels == c]
    ax.scatter(points[:, 0], points[:, 1], s=14, color=color, label=str(class_names[int(c)]))
  if 0 < len(present) <= MAX_LEGEND_CLASSES:
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
  ax.set_xticks([])
  ax.set_yticks([])
  ax.set_title(title or "UMAP of features", fontsize=10)
  buf = io.BytesIO()
  fig.savefig(buf, format="png", bbox_inches="tight")  # "tight" keeps the outside legend in the file
  artifacts.write_bytes(path, buf.getvalue())
  return embedding
