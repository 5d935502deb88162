"""The one place that touches the file system for artifacts: local paths and URLs alike.

A path with a scheme (`gs://bucket/run`, or `ram://...`, TensorFlow's in-memory file system that
tests use in place of a bucket) goes through `tf.io.gfile`, which knows every file system
TensorFlow was built with. Local paths go through `os` and the builtins: no TensorFlow import, and
files that can be fsynced. TensorFlow is imported only when a remote path is used.

Object stores have no real directories: `makedirs` on gs:// writes empty marker objects, and
`listdir` names sub-directories without their trailing '/' here. ram:// has quirks of its own:
writing to an existing file appends to it (handled here), and it lists and tests directories by
name prefix (`listdir('ram://w/images')` also shows '.npz' for a sibling 'ram://w/images.npz').
"""

from __future__ import annotations

import builtins
import errno
import os
import posixpath
from typing import IO


def is_remote(path: str) -> bool:
  return "://" in str(path)


def import_tensorflow():
  """TensorFlow, imported on first use (remote paths, TFDS) and kept off GPUs/TPUs: they belong to
  JAX, and TensorFlow would otherwise reserve accelerator memory. Raises ImportError without it."""
  import tensorflow as tf  # Local import: only remote paths and TFDS pay TensorFlow's import time.
  for kind in ("GPU", "TPU"):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):  # devices already initialized, or no such device type
      pass
  return tf


def _gfile():
  try:
    return import_tensorflow().io.gfile
  except ImportError:
    raise ValueError("paths with a scheme (gs://, ram://, ...) are read and written through TensorFlow's "
                     "file systems, and TensorFlow is not installed (pip install tensorflow-cpu, see "
                     "requirements.txt)") from None


def _clear_for_write(path: str) -> None:
  # TensorFlow's ram:// appends to an existing file opened for writing instead of replacing it
  # (gs:// replaces an object whole, so it needs no removal and never lacks the object).
  if path.startswith("ram://") and _gfile().exists(path):
    _gfile().remove(path)


def abspath(path: str) -> str:
  """Absolute local path; a remote path is already absolute and comes back unchanged."""
  return path if is_remote(path) else os.path.abspath(path)


def exists(path: str) -> bool:
  return _gfile().exists(path) if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _gfile().isdir(path) if is_remote(path) else os.path.isdir(path)


def size(path: str) -> int:
  """Size of file `path` in bytes."""
  return int(_gfile().stat(path).length) if is_remote(path) else os.path.getsize(path)


def walk_files(directory: str) -> list[str]:
  """Paths (relative to `directory`, '/'-separated) of every file below it, sorted."""
  out = []
  if is_remote(directory):
    for root, _, files in _gfile().walk(directory):
      rel = root[len(directory):].strip("/")
      out += [f"{rel}/{f}" if rel else f for f in files]
  else:
    for root, _, files in os.walk(directory):
      rel = os.path.relpath(root, directory).replace(os.sep, "/")
      out += [f if rel == "." else f"{rel}/{f}" for f in files]
  return sorted(out)


def makedirs(path: str) -> None:
  """Creates `path` and its parents; an existing directory is fine."""
  if is_remote(path):
    _gfile().makedirs(path)
  else:
    os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
  """Names of the entries of directory `path` (files and sub-directories), sorted."""
  if is_remote(path):
    return sorted(name.rstrip("/") for name in _gfile().listdir(path))
  return sorted(os.listdir(path))


def remove(path: str) -> None:
  if is_remote(path):
    _gfile().remove(path)
  else:
    os.remove(path)


def open(path: str, mode: str = "rb") -> IO:  # noqa: A001 -- the file-system `open`, by design
  """A file object for `path` ('r'/'w' text in UTF-8, 'rb'/'wb' binary).

  Remote files are readable and seekable (np.load, zipfile, Pillow); remote writes are buffered and
  uploaded when the file is closed, even after an error, so artifacts are written with
  `artifacts.write_*` (whole or not at all). A missing file raises FileNotFoundError on either kind.
  """
  if not is_remote(path):
    return builtins.open(path, mode, **({} if "b" in mode else {"encoding": "utf-8"}))
  gfile = _gfile()
  if "r" in mode and not gfile.exists(path):  # GFile opens lazily and fails on the first read
    raise FileNotFoundError(errno.ENOENT, "file not found", path)
  if "w" in mode:
    _clear_for_write(path)
  return gfile.GFile(path, mode)


def upload(local_path: str, path: str) -> None:
  """Copies the local file `local_path` to the remote `path` (one upload, replacing any object)."""
  if not is_remote(path):
    raise ValueError(f"{path}: upload expects a remote destination (scheme://...)")
  _clear_for_write(path)
  _gfile().copy(local_path, path, overwrite=True)


def relpath(path: str, start: str) -> str:
  """`path` relative to directory `start`, with '/' separators (for links in reports).

  Two local paths, or two remote paths under the same scheme and bucket, give a relative path;
  otherwise `path` comes back absolute.
  """
  if not is_remote(path) and not is_remote(start):
    return os.path.relpath(os.path.abspath(path), os.path.abspath(start)).replace(os.sep, "/")
  if not (is_remote(path) and is_remote(start)):
    return abspath(path)
  (scheme, rest), (start_scheme, start_rest) = path.split("://", 1), start.split("://", 1)
  if scheme != start_scheme or rest.split("/", 1)[0] != start_rest.split("/", 1)[0]:
    return path
  return posixpath.relpath("/" + rest, "/" + start_rest)
