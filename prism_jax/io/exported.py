"""Traced programs kept next to the persistent compilation cache, so a rerun skips Python tracing.

JAX's persistent compilation cache skips XLA compilation, but its key is the lowered program, so
every process still traces each program in Python first: for a teacher's forward pass, autodiff
and vmap that is about a second per teacher on a small CPU, the larger part of what a second
CIFAR-10 recovery spent compiling. `Program` wraps a function to be jitted; on a call it looks
for the function's `jax.export` serialization for these static arguments and input types, and
calls that instead of tracing again (XLA's compilation of it then comes from the persistent cache
as before). A first call exports and writes it.

The key is everything the traced program depends on: the function's name, the static arguments'
types and reprs, every input's shape, dtype, weak type and sharding, the JAX configuration that
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
import threading

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


def _input_signature(x) -> str:
  sharding = getattr(x, "sharding", None)
  aval = jax.typeof(x)
  return f"{aval.str_short()}:{getattr(aval, 'weak_type', False)}:{sharding!r}"


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

  Call it as the jitted function, static arguments by keyword. `clear()` forgets the loaded
  programs of this process (their files stay)."""

  def __init__(self, fn, *, static_argnames: tuple[str, ...], donate_argnums: tuple[int, ...] = ()):
    self.name = f"{fn.__module__}.{fn.__qualname__}"
    self._fn = fn
    self._static = tuple(static_argnames)
    self._donate = tuple(donate_argnums)
    self._jitted = jax.jit(fn, static_argnames=self._static, donate_argnums=self._donate)
    self._loaded: dict[str, object] = {}
    self._lock = threading.Lock()
    self.exported = self.loaded = 0  # programs written / read back by this process

  def lower(self, *args, **static):
    return self._jitted.lower(*args, **static)

  def eval_shape(self, *args, **static):
    return jax.eval_shape(functools.partial(self._fn, **static), *args)

  def clear(self) -> None:
    with self._lock:
      self._loaded.clear()

  def cache_size(self) -> int:
    """Compiled executables this process holds for the function (loaded or traced)."""
    return self._jitted._cache_size() + sum(call._cache_size() for call in list(self._loaded.values()))

  def __call__(self, *args, **static):
    where = directory()
    key = self._key(args, static) if where else None
    if key is None:
      return self._jitted(*args, **static)
    call = self._loaded.get(key)
    if call is None:
      call = self._load_or_export(os.path.join(where, f"{self.name.rsplit('.', 1)[-1]}-{key}.bin"), args, static)
      with self._lock:
        self._loaded[key] = call
    return call(*args)

  def _key(self, args, static) -> str | None:
    parts = _base_key(self.name, static)
    if parts is None:
      return None
    leaves, tree = jax.tree_util.tree_flatten(args)
    parts += [repr(self._donate), repr(tree)] + [_input_signature(x) for x in leaves]
    return _digest(parts)

  def _load_or_export(self, path: str, args, static):
    exported = None
    if fs.exists(path):
      try:
        with fs.open(path, "rb") as f:
          exported = jax.export.deserialize(bytearray(f.read()))
        self.loaded += 1
      except Exception:  # noqa: BLE001 -- any unreadable file (truncated, foreign): export it again below
        exported = None
    if exported is None:
      exported = jax.export.export(jax.jit(functools.partial(self._fn, **static)))(*args)
      try:
        artifacts.write_bytes(path, bytes(exported.serialize()))
        self.exported += 1
      except OSError:
        pass  # a read-only cache still works, without the saving
    return jax.jit(exported.call, donate_argnums=self._donate)
