"""The persistent compilation cache: a second process in a fresh work directory reads the programs
the first one compiled (cache-hit counters, not wall-clock thresholds); compile statistics."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from cli_utils import run_cli
from prism_jax.io import compilation

TINY_SQUEEZE = ("--config.stage=squeeze", "--config.squeeze.teachers=('resnet18',)",
                "--config.squeeze.width=0.125", "--config.squeeze.epochs=1")
SUMMARY = re.compile(r"\[prism_jax\] compilation: (\d+) program\(s\), ([\d.]+) s .*?XLA ([\d.]+) s\)"
                     r"(?:, (\d+) of them read from the persistent cache| \(persistent cache off\))")


def _summary(stdout: str):
  match = SUMMARY.search(stdout)
  assert match, stdout[-2000:]
  programs, compile_s, xla_s, hits = match.groups()
  return int(programs), float(compile_s), float(xla_s), None if hits is None else int(hits)


def test_second_process_reads_the_programs_the_first_compiled(tmp_path):
  cache = str(tmp_path / "cache")
  first = run_cli("configs/quickstart.py", str(tmp_path / "w1"), *TINY_SQUEEZE, f"--compilation_cache_dir={cache}")
  assert first.returncode == 0, first.stderr[-3000:]
  programs, _, first_xla_s, hits = _summary(first.stdout)
  assert programs >= 5 and hits == 0
  assert len(os.listdir(cache)) >= programs  # every program was written, however fast it compiled
  second = run_cli("configs/quickstart.py", str(tmp_path / "w2"), *TINY_SQUEEZE, f"--compilation_cache_dir={cache}")
  assert second.returncode == 0, second.stderr[-3000:]
  programs2, _, second_xla_s, hits2 = _summary(second.stdout)
  assert programs2 == programs and hits2 == programs  # every program came from the cache
  assert second_xla_s < first_xla_s
  # The same teacher either way: the cache changes nothing but the time.
  w1 = open(tmp_path / "w1" / "teachers" / "resnet18" / "variables.msgpack", "rb").read()
  w2 = open(tmp_path / "w2" / "teachers" / "resnet18" / "variables.msgpack", "rb").read()
  assert w1 == w2
  # An empty directory turns the cache off (a stage with nothing to do is enough to see it).
  off = run_cli("configs/quickstart.py", str(tmp_path / "w3"), "--config.stage=diffusion", "--compilation_cache_dir=")
  assert off.returncode == 0, off.stderr[-3000:]
  assert _summary(off.stdout)[3] is None and "persistent cache off" in off.stdout


def test_compile_stats_count_this_processes_compilations():
  x = jnp.ones(7).block_until_ready()
  stats = compilation.CompileStats()

  @jax.jit
  def fresh(x):
    return jnp.sin(x) * 3.0 + jnp.arange(7.0)

  fresh(x).block_until_ready()
  assert stats.programs == 1
  fresh(x).block_until_ready()  # cached in memory: no second compilation
  assert stats.programs == 1
  assert stats.compile_s > 0 and stats.backend_s > 0
  assert stats.as_dict()["programs"] == stats.programs


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert compilation.default_cache_dir() == os.path.join(str(tmp_path), "prism_jax", "jax_cache")
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/somewhere/else")
  assert compilation.default_cache_dir() == "/somewhere/else"


def _counting_program(monkeypatch, directory):
  from prism_jax.io import exported
  monkeypatch.setattr(exported, "directory", lambda: directory)
  traces = []

  def scaled(x, y, *, power):
    traces.append(power)  # runs only while tracing
    return {"out": jnp.sin(x) ** power + y, "sum": jnp.sum(x)}

  return exported, traces, scaled


def test_exported_program_is_read_back_instead_of_traced(monkeypatch, tmp_path):
  exported, traces, scaled = _counting_program(monkeypatch, str(tmp_path / "exported"))
  x, y = jnp.linspace(0.0, 3.0, 12).reshape(3, 4), jnp.float32(0.5)
  want = jax.jit(scaled, static_argnames=("power",))(x, y, power=3)
  assert traces == [3]
  first = exported.Program(scaled, static_argnames=("power",))
  got = first(x, y, power=3)
  assert traces == [3, 3] and first.exported == 1 and len(os.listdir(tmp_path / "exported")) == 1
  # A new process's Program (here: a fresh object) reads the file: no tracing, bit-identical results.
  second = exported.Program(scaled, static_argnames=("power",))
  again = second(x, y, power=3)
  assert traces == [3, 3] and second.loaded == 1 and second.exported == 0
  for key in ("out", "sum"):
    np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]))
    np.testing.assert_array_equal(np.asarray(again[key]), np.asarray(want[key]))
  assert second.cache_size() >= 1
  # Another static value or input type is another program; each is traced once.
  second(x, y, power=2)
  second(x[:2], y, power=3)
  assert traces == [3, 3, 2, 3] and len(os.listdir(tmp_path / "exported")) == 3
  # The key covers prism_jax's sources: a code change never calls a stale program.
  monkeypatch.setattr(exported, "source_digest", lambda: "changed")
  exported.Program(scaled, static_argnames=("power",))(x, y, power=3)
  assert traces == [3, 3, 2, 3, 3]


def test_damaged_export_is_made_again_and_off_means_plain_jit(monkeypatch, tmp_path):
  directory = tmp_path / "exported"
  exported, traces, scaled = _counting_program(monkeypatch, str(directory))
  x, y = jnp.ones((2, 2)), jnp.float32(1.0)
  want = exported.Program(scaled, static_argnames=("power",))(x, y, power=2)
  (name,) = os.listdir(directory)
  (directory / name).write_bytes((directory / name).read_bytes()[:100])  # truncated
  fresh = exported.Program(scaled, static_argnames=("power",))
  np.testing.assert_array_equal(np.asarray(fresh(x, y, power=2)["out"]), np.asarray(want["out"]))
  assert fresh.loaded == 0 and fresh.exported == 1 and len(traces) == 2
  assert (directory / name).stat().st_size > 100  # whole again
  # A static argument whose repr holds an object address cannot be keyed: traced, never written.
  class Opaque:
    pass
  exported.Program(lambda x, *, tag: x + 1, static_argnames=("tag",))(x, tag=Opaque())
  assert os.listdir(directory) == [name]
  # The persistent cache off (no directory): plain jax.jit, no files.
  monkeypatch.setattr(exported, "directory", lambda: None)
  off = exported.Program(scaled, static_argnames=("power",))
  np.testing.assert_array_equal(np.asarray(off(x, y, power=2)["out"]), np.asarray(want["out"]))
  assert off.exported == off.loaded == 0 and len(traces) == 3


def test_teacher_shapes_are_kept_beside_the_exports(monkeypatch, tmp_path):
  from prism_jax.io import exported
  from prism_jax.models import torchvision_import
  import prism_jax.models as models
  monkeypatch.setattr(exported, "directory", lambda: str(tmp_path))
  model = models.create_model("resnet18", num_classes=3, stem="small", width=0.125)
  calls = []

  def expected():
    calls.append(1)
    return torchvision_import.expected_variables(model, (1, 8, 8, 3))

  first = exported.leaf_shapes(expected, name="model_variables", static={"model": model, "x": (1, 8, 8, 3)})
  second = exported.leaf_shapes(expected, name="model_variables", static={"model": model, "x": (1, 8, 8, 3)})
  assert first == second and len(calls) == 1 and first[("params", "fc", "kernel")] == (64, 3)
