"""Work-directory layout, atomic writes and consistency checks for stage artifacts.

Every artifact appears complete or not at all, so a reader never sees a half-written file: a file
that exists is complete. Stages mark completion by writing their metadata JSON last. Paths may be
local or remote (gs://...; see io/fs.py), and every read and write goes through `fs`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from typing import Any, Iterator, Mapping

import numpy as np

from prism_jax import errors
from prism_jax.io import fs


def _file_mode() -> int:
  # Read once at import: os.umask can only be read by setting it, which is not thread-safe (the
  # exporter writes from a thread pool).
  umask = os.umask(0o022)
  os.umask(umask)
  return 0o666 & ~umask


_FILE_MODE = _file_mode()


ArtifactError = errors.ArtifactError  # re-exported: every artifact reader raises it


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary local path to write; on success its content becomes `path` in one step.

  Local `path`: the temporary file is a sibling, fsynced and moved into place with `os.replace`.
  Remote `path` (gs://...): an object store has no atomic rename (a gs:// rename is copy + delete),
  but an object becomes visible only when its upload completes. So the file is staged in the local
  temporary directory and uploaded straight to `path` once it is whole: a reader sees the previous
  object or the new one, never part of it, and a writer that fails uploads nothing. (Writing through
  an open remote file would not do: closing it after an error uploads what was written so far.)
  """
  remote = fs.is_remote(path)
  directory = tempfile.gettempdir() if remote else os.path.dirname(os.path.abspath(path))
  fs.makedirs(os.path.dirname(path) if remote else directory)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
  os.close(fd)
  os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600; artifacts get the umask's mode, like any other file
  try:
    yield tmp
    if remote:
      fs.upload(tmp, path)
    else:
      with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
      os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_bytes(path: str, data: bytes) -> None:
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(data)


def write_json(path: str, obj: Any) -> None:
  write_bytes(path, (json.dumps(to_jsonable(obj), indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str) -> Any:
  try:
    with fs.open(path, "r") as f:
      return json.load(f)
  except FileNotFoundError:
    raise ArtifactError(f"{path}: file not found") from None
  except json.JSONDecodeError as e:
    raise ArtifactError(f"{path}: not valid JSON ({e}); the file is corrupt") from None


def write_npz(path: str, **arrays: np.ndarray) -> None:
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)


def sha256_bytes(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def read_verified_bytes(path: str, expected_sha256: str | None) -> bytes:
  """The bytes of `path`, checked against the checksum its metadata recorded (ArtifactError if it is
  missing, corrupt or truncated)."""
  try:
    with fs.open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    raise ArtifactError(f"{path}: variables file missing") from None
  if sha256_bytes(data) != expected_sha256:
    raise ArtifactError(f"{path}: checksum mismatch; the file is corrupt or truncated")
  return data


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with fs.open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def to_jsonable(obj: Any) -> Any:
  """Converts ConfigDicts, tuples, numpy scalars and arrays to plain JSON types."""
  if hasattr(obj, "to_dict") and callable(obj.to_dict):
    obj = obj.to_dict()
  if isinstance(obj, Mapping):
    return {str(k): to_jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_jsonable(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  if isinstance(obj, np.generic):
    return obj.item()
  return obj


def diff_fields(expected: Mapping[str, Any], found: Mapping[str, Any], prefix: str = "") -> list[str]:
  """Lists dotted field names whose values differ between two nested mappings."""
  expected, found = to_jsonable(expected), to_jsonable(found)
  diffs = []
  for key in sorted(set(expected) | set(found)):
    name = f"{prefix}{key}"
    if key not in expected or key not in found:
      diffs.append(name)
    elif isinstance(expected[key], dict) and isinstance(found[key], dict):
      diffs.extend(diff_fields(expected[key], found[key], prefix=name + "."))
    elif expected[key] != found[key]:
      diffs.append(name)
  return diffs


def check_same(what: str, path: str, expected: Mapping[str, Any], found: Mapping[str, Any]) -> None:
  """Raises ArtifactError naming every differing field, with both values."""
  diffs = diff_fields(expected, found)
  if not diffs:
    return
  exp_flat, found_flat = _flatten(to_jsonable(expected)), _flatten(to_jsonable(found))
  lines = [f"  {d}: this run has {exp_flat.get(d, '<absent>')!r}, the artifact has {found_flat.get(d, '<absent>')!r}"
           for d in diffs[:10]]
  raise ArtifactError(
      f"{path}: {what} was made with a different configuration:\n" + "\n".join(lines) +
      "\nUse a fresh --workdir, or delete the artifact to recompute it.")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(d, dict):
    return {prefix.rstrip("."): d}
  out = {}
  for k, v in d.items():
    out.update(_flatten(v, f"{prefix}{k}."))
  return out
