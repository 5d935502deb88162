""""Skip if done": one completion check for every stage, correct with several processes.

A stage writes a completion marker (JSON) last, holding the fingerprint of what it made and the size
and sha256 of the files it vouches for. Before skipping, `finished` checks all three:
  - no marker                         -> None (run the work)
  - marker made with another config   -> ArtifactError naming every differing field (on every process)
  - a vouched-for file missing or not the recorded size / checksum -> None, with one line saying
                                         which file and that the work is redone
  - otherwise                         -> the marker (skip)
Process 0 decides and broadcasts its decision, so every process of a multi-process run skips or
runs alike (their work directories need not be shared: a process that cannot read the marker gets
`{"fingerprint": ...}`).
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping

from prism_jax.io import artifacts, fs

_NOT_DONE, _DONE, _REFUSED = 0, 1, 2


def record_files(directory: str, names: Iterable[str]) -> dict:
  """{name: {"size", "sha256"}} of files in `directory`, for a marker's "files" field."""
  out = {}
  for name in names:
    path = os.path.join(directory, name)
    out[name] = {"size": fs.size(path), "sha256": artifacts.sha256_file(path)}
  return out


def damaged_file(directory: str, files: Mapping[str, Mapping]) -> str | None:
  """The first file of a marker's "files" record that is missing or differs, with the reason."""
  for name, want in sorted(files.items()):
    path = os.path.join(directory, name)
    if not fs.exists(path):
      return f"{path} is missing"
    if fs.size(path) != want["size"]:
      return f"{path} is {fs.size(path)} bytes, the marker recorded {want['size']}"
    if artifacts.sha256_file(path) != want["sha256"]:
      return f"{path} fails its checksum"
  return None


def finished(marker: str, fingerprint: Mapping, what: str, *, tag: str,
             fingerprint_of=lambda meta: meta.get("fingerprint", {}), damage_of=None) -> dict | None:
  """The marker if the work it records is finished, made with `fingerprint` and intact (see module
  docstring); `what` names the artifact in the refusal, `tag` prefixes the redo line. `damage_of(meta)`
  replaces the check of the marker's "files" record for markers that record their files otherwise."""
  from prism_jax.parallel import multihost

  meta, refused, status = None, None, _NOT_DONE
  if multihost.is_main_process() and fs.exists(marker):
    meta = artifacts.read_json(marker)
    try:
      artifacts.check_same(what, marker, fingerprint, fingerprint_of(meta))
      damage = (damage_of(meta) if damage_of is not None else
                damaged_file(os.path.dirname(marker), meta.get("files", {})))
      if damage:
        print(f"[{tag}] {damage}, though {os.path.basename(marker)} vouches for it: redoing the work",
              flush=True)
        status = _NOT_DONE
      else:
        status = _DONE
    except artifacts.ArtifactError as e:
      refused, status = e, _REFUSED
  status = multihost.broadcast_from_main(status)
  if status == _REFUSED:
    raise refused or artifacts.ArtifactError(
        f"{marker}: process 0 holds a finished {what} made with another config (see its error)")
  if status == _NOT_DONE:
    return None
  if meta is None:
    meta = artifacts.read_json(marker) if fs.exists(marker) else {"fingerprint": dict(fingerprint)}
  return meta
