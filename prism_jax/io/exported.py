"""Traced programs kept next to the persistent compilation cache, so a rerun skips Python tracing.

JAX's persistent compilation cache skips XLA compilation, but its key is the lowered program, so
every process still traces each program in Python first: for a teacher's forward pass, autodiff
and vmap that is about a second per teacher on a small CPU, the larger part of what a second
CIFAR-10 recovery spent compiling. `Program` wraps a function to be jitted; on a call it looks
for the function's `jax.export` serialization for these static arguments and input types, and
calls that instead of tracing again (XLA's compilation of it then comes from the persistent cache
as before). A first call exports and writes it.

The key is everything the traced program depends on: the function's name, the static arguments'
types and reprs, every input's shape, dtype and weak type (the exported programs take their
partitioning from the mesh, a static argument), the JAX configuration that
changes tracing (matmul precision, x64, the PRNG), the backend and devices, the versions of jax,
jaxlib, flax and optax, and a digest of prism_jax's own source files (any code change makes new
keys: nothing stale is ever called). A static argument whose repr is not deterministic (it holds
an object address) is not cached: such a call is traced as usual. The files live in
`<compilation cache dir>/prism_jax_exported/`, so the cache flag moves or turns them off too
(`--compilation_cache_dir=''`: no files, plain `jax.jit`). A file that cannot be read is exported
again; writes are atomic. The exported program is the same StableHLO the function lowers to, and
its results are bit-identical (tests/test_compilation.py).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import re

import jax

from prism_jax.io import artifacts, fs

SUBDIR = "prism_jax_exported"
_TRACE_CONFIG = ("jax_default_matmul_precision", "jax_enable_x64", "jax_threefry_partitionable",
                 "jax_default_prng_impl", "jax_numpy_rank_promotion", "jax_numpy_dtype_promotion")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
  """sha256 of prism_jax's Python sources (paths and contents), computed once per process."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  digest = hashlib.sha256()
  for directory, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if d != "__pycache__")
    for name in sorted(f for f in files if f.endswith(".py")):
      path = os.path.join(directory, name)
      digest.update(os.path.relpath(path, root).encode() + b"\0")
      with open(path, "rb") as f:
        digest.update(f.read() + b"\0")
  return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def _versions() -> str:
  return ";".join(f"{p}={importlib.metadata.version(p)}" for p in ("jax", "jaxlib", "flax", "optax"))


def directory() -> str | None:
  """Where exported programs live: beside the persistent compilation cache; None when it is off."""
  if not jax.config.jax_enable_compilation_cache:
    return None
  cache = jax.config.jax_compilation_cache_dir
  return os.path.join(cache, SUBDIR) if cache else None


def _static_repr(value) -> str | None:
  text = f"{type(value).__module__}.{type(value).__qualname__}:{value!r}"
  return None if _ADDRESS.search(text) else text


def _base_key(name: str, static: dict) -> list[str] | None:
  parts = [name, source_digest(), _versions(), jax.default_backend(),
           repr([(d.platform, d.id) for d in jax.devices()])]
  parts += [f"{option}={getattr(jax.config, option)!r}" for option in _TRACE_CONFIG]
  for key in sorted(static):
    text = _static_repr(static[key])
    if text is None:
      return None
    parts.append(f"{key}={text}")
  return parts


def _digest(parts: list[str]) -> str:
  return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:40]


def leaf_shapes(fn, *, name: str, static: dict) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{key path: shape} of every leaf of `jax.eval_shape(fn)` (fn takes no arguments and is fully
  determined by `static`), kept beside the exported programs: what a model's variables should look
  like, without tracing its initializer again (about 0.3 s per teacher)."""
  def compute():
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(dict(jax.eval_shape(fn)))[0]:
      out[tuple(str(getattr(p, "key", p)) for p in path)] = tuple(leaf.shape)
    return out

  where = directory()
  parts = _base_key(name, static) if where else None
  if parts is None:
    return compute()
  path = os.path.join(where, f"{name}-{_digest(parts)}.json")
  if fs.exists(path):
    try:
      with fs.open(path, "r") as f:
        return {tuple(p): tuple(shape) for p, shape in json.load(f)}
    except (OSError, ValueError, TypeError):
      pass  # unreadable: computed and written again
  shapes = compute()
  try:
    artifacts.write_bytes(path, json.dumps([[list(p), list(shape)] for p, shape in shapes.items()]).encode())
  except OSError:
    pass
  return shapes


class Program:
  """`jax.jit(fn, static_argnames=..., donate_argnums=...)` whose tracing is kept on disk (above).

  Call it as the jitted function, static arguments by keyword. The lookup happens while JAX traces
  a call (once per static arguments and input types, as tracing `fn` would), so a call that JAX has
  already compiled costs what a jitted call costs. For functions whose partitioning is explicit
  (a `shard_map` over a mesh passed as a static argument): inputs are keyed by type, not sharding."""

  def __init__(self, fn, *, static_argnames: tuple[str, ...], donate_argnums: tuple[int, ...] = ()):
    self.name = f"{fn.__module__}.{fn.__qualname__}"
    self._fn = fn
    self._donate = tuple(donate_argnums)
    self._jitted = jax.jit(fn, static_argnames=tuple(static_argnames), donate_argnums=self._donate)
    self._via_file = jax.jit(self._from_file, static_argnames=tuple(static_argnames),
                             donate_argnums=self._donate)
    self._keyable: dict = {}
    self.exported = self.loaded = 0  # programs written / read back by this process

  def lower(self, *args, **static):
    return self._jitted.lower(*args, **static)

  def eval_shape(self, *args, **static):
    return jax.eval_shape(functools.partial(self._fn, **static), *args)

  def cache_size(self) -> int:
    """Compiled executables this process holds for the function."""
    return self._jitted._cache_size() + self._via_file._cache_size()

  def __call__(self, *args, **static):
    if directory() is None or not self._static_keyable(static):
      return self._jitted(*args, **static)
    return self._via_file(*args, **static)

  def _static_keyable(self, static) -> bool:
    signature = tuple(sorted(static.items()))
    keyable = self._keyable.get(signature)
    if keyable is None:
      keyable = self._keyable[signature] = _base_key(self.name, static) is not None
    return keyable

  def _from_file(self, *args, **static):
    """Traced by `_via_file` in place of `fn`: the exported program for these inputs, read back or
    exported now, called on the (traced) inputs."""
    leaves, tree = jax.tree_util.tree_flatten(args)
    avals = [jax.typeof(x) for x in leaves]
    parts = _base_key(self.name, static) + [repr(self._donate), repr(tree)]
    parts += [f"{a.str_short()}:{getattr(a, 'weak_type', False)}" for a in avals]
    where = directory()
    path = os.path.join(where, f"{self.name.rsplit('.', 1)[-1]}-{_digest(parts)}.bin")
    specs = jax.tree_util.tree_unflatten(
        tree, [jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=getattr(a, "weak_type", False)) for a in avals])
    return self._load_or_export(path, specs, static).call(*args)

  def _load_or_export(self, path: str, specs, static):
    if fs.exists(path):
      try:
        with fs.open(path, "rb") as f:
          found = jax.export.deserialize(bytearray(f.read()))
        self.loaded += 1
        return found
      except Exception:  # noqa: BLE001 -- any unreadable file (truncated, foreign): export it again below
        pass
    made = jax.export.export(jax.jit(functools.partial(self._fn, **static)))(*specs)
    try:
      artifacts.write_bytes(path, bytes(made.serialize()))
      self.exported += 1
    except OSError:
      pass  # a read-only cache still works, without the saving
    return made
