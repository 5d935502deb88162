"""TensorBoard writing and terminal progress with rate and ETA.

Event files for a local log directory are written here, with TensorBoard's own protocol buffers and
no TensorFlow: importing TensorFlow costs about 11 s per process on a small CPU machine, and on GPU
machines it is a heavy dependency that competes with JAX for the accelerator. The writers follow
clu's `MetricWriter` interface (write_scalars / write_images / write_texts / write_hparams / flush
/ close), so stages do not care which one they get. A remote log directory (gs://...) goes through
clu's `SummaryWriter`, whose file system layer is TensorFlow's. Without the `tensorboard` package
(or without TensorFlow for a remote directory) a warning is printed once and only the terminal
progress remains.
"""

from __future__ import annotations

import io
import os
import socket
import struct
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np

from prism_jax.io import fs

_EVENT_FILE_VERSION = "brain.Event:2"


class EventFileWriter:
  """Appends TensorBoard `Event` records (TFRecord framing, masked CRC-32C) to one local file.

  A record is: uint64 length, uint32 masked CRC of the length, the serialized Event, uint32 masked
  CRC of it. Every record is written whole and flushed, so a killed run leaves a readable file.
  """

  def __init__(self, logdir: str):
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
    self._event_pb2, self._summary_pb2, self._crc = event_pb2, summary_pb2, masked_crc32c
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}.prism_jax"
    self.path = os.path.join(logdir, name)
    self._file = open(self.path, "ab")
    self._write_event(self._event_pb2.Event(wall_time=time.time(), file_version=_EVENT_FILE_VERSION))

  def _write_event(self, event) -> None:
    data = event.SerializeToString()
    header = struct.pack("<Q", len(data))
    self._file.write(header + struct.pack("<I", self._crc(header)) + data +
                     struct.pack("<I", self._crc(data)))
    self._file.flush()

  def write_summary(self, step: int, values: list) -> None:
    summary = self._summary_pb2.Summary(value=values)
    self._write_event(self._event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

  def scalar_value(self, tag: str, value: float):
    return self._summary_pb2.Summary.Value(tag=tag, simple_value=float(value))

  def images_value(self, tag: str, images: np.ndarray):
    """N images under one tag, as `tf.summary.image` writes them (and TensorBoard's images plugin
    reads them): a string tensor [width, height, png_0, ..., png_N-1] with plugin 'images'."""
    from PIL import Image
    from tensorboard.compat.proto import tensor_pb2, tensor_shape_pb2
    encoded = []
    for image in images:
      image = _to_uint8_image(image)
      buffer = io.BytesIO()
      Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buffer, format="PNG")
      encoded.append(buffer.getvalue())
    height, width = _to_uint8_image(images[0]).shape[:2]
    metadata = self._summary_pb2.SummaryMetadata(
        plugin_data=self._summary_pb2.SummaryMetadata.PluginData(plugin_name="images"))
    tensor = tensor_pb2.TensorProto(
        dtype=7, string_val=[str(width).encode(), str(height).encode(), *encoded],  # 7 = DT_STRING
        tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=len(encoded) + 2)]))
    return self._summary_pb2.Summary.Value(tag=tag, metadata=metadata, tensor=tensor)

  def text_value(self, tag: str, text: str):
    from tensorboard.compat.proto import tensor_pb2, tensor_shape_pb2
    metadata = self._summary_pb2.SummaryMetadata(
        plugin_data=self._summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
    tensor = tensor_pb2.TensorProto(dtype=7, string_val=[str(text).encode()],  # 7 = DT_STRING
                                    tensor_shape=tensor_shape_pb2.TensorShapeProto())
    return self._summary_pb2.Summary.Value(tag=tag, metadata=metadata, tensor=tensor)

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    if not self._file.closed:
      self._file.close()


def _to_uint8_image(image: np.ndarray) -> np.ndarray:
  """HWC (or HW) uint8 from uint8, or from floats in [0, 1] (clu's convention)."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.dtype != np.uint8:
    image = np.clip(np.round(image.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
  return image


class LocalSummaryWriter:
  """clu-style metric writer that writes TensorBoard event files without TensorFlow."""

  def __init__(self, logdir: str):
    self._events = EventFileWriter(logdir)

  @property
  def path(self) -> str:
    return self._events.path

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    self._events.write_summary(step, [self._events.scalar_value(k, v) for k, v in scalars.items()])

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    values = []
    for key, batch in images.items():
      batch = np.asarray(batch)
      if batch.ndim == 2 or (batch.ndim == 3 and batch.shape[-1] in (1, 3, 4)):  # one image, no batch axis
        batch = batch[None]
      values.append(self._events.images_value(key, batch))
    self._events.write_summary(step, values)

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    self._events.write_summary(step, [self._events.text_value(k, v) for k, v in texts.items()])

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    self.write_texts(0, {"hparams": "\n".join(f"{k}: {v}" for k, v in sorted(hparams.items()))})

  def flush(self) -> None:
    self._events.flush()

  def close(self) -> None:
    self._events.close()


class NullWriter:
  """A writer that drops everything (other processes, or no TensorBoard backend available)."""

  def write_scalars(self, step, scalars): pass
  def write_images(self, step, images): pass
  def write_texts(self, step, texts): pass
  def write_hparams(self, hparams): pass
  def flush(self): pass
  def close(self): pass


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
  if message not in _WARNED:
    _WARNED.add(message)
    print(f"[prism_jax] warning: {message}", file=sys.stderr, flush=True)


def create_writer(logdir: str):
  """A TensorBoard writer for `logdir` on process 0; other processes write nothing.

  Local directories get `LocalSummaryWriter` (no TensorFlow). A URL (gs://, or ram:// in tests)
  gets clu's `SummaryWriter`, built here rather than with `create_default_writer`, which parses the
  path with etils.epath (gs/s3/az/hf URLs only).
  """
  if jax.process_index() != 0:
    return NullWriter()
  if not fs.is_remote(logdir):
    try:
      return LocalSummaryWriter(logdir)
    except ImportError:
      _warn_once("the `tensorboard` package is not installed: no TensorBoard logs are written "
                 "(progress is still printed)")
      return NullWriter()
  try:
    from clu import metric_writers  # imports TensorFlow: only remote log directories pay for it
  except ImportError:
    _warn_once(f"{logdir}: writing TensorBoard logs to a URL needs TensorFlow, which is not installed: "
               "no TensorBoard logs are written (progress is still printed)")
    return NullWriter()
  return metric_writers.SummaryWriter(logdir)


def format_duration(seconds: float) -> str:
  seconds = max(0, int(round(seconds)))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
  """Prints `[name] step k/N (p%) | rate | ETA | metrics` at most every `interval_s` seconds.

  The rate counts only work done in this process's lifetime, so a resumed run reports an honest
  ETA instead of one inflated by the steps it skipped.
  """

  def __init__(self, name: str, total: int, *, start: int = 0, unit: str = "step",
               items_per_step: float = 1.0, item_unit: str = "img", interval_s: float = 10.0,
               stream=None):
    self.name, self.total, self.unit = name, total, unit
    self.items_per_step, self.item_unit = items_per_step, item_unit
    self.interval_s = interval_s
    self.stream = stream or sys.stdout
    self._start_step, self._start_time = start, time.perf_counter()
    self._last_print = -float("inf")
    self.enabled = jax.process_index() == 0

  def rate(self, step: int) -> float:
    elapsed = time.perf_counter() - self._start_time
    return (step - self._start_step) / elapsed if elapsed > 0 else 0.0

  def update(self, step: int, metrics: dict | None = None, force: bool = False) -> None:
    now = time.perf_counter()
    if not self.enabled or (not force and now - self._last_print < self.interval_s):
      return
    self._last_print = now
    steps_per_s = self.rate(step)
    eta = (self.total - step) / steps_per_s if steps_per_s > 0 else float("nan")
    parts = [f"[{self.name}] {self.unit} {step}/{self.total} ({100.0 * step / max(self.total, 1):.1f}%)"]
    if steps_per_s > 0:
      parts.append(f"{steps_per_s * self.items_per_step:.1f} {self.item_unit}/s")
      parts.append(f"ETA {format_duration(eta)}")
    for k, v in (metrics or {}).items():
      parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    print(" | ".join(parts), file=self.stream, flush=True)
