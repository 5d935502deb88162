"""The persistent compilation cache: a second process in a fresh work directory reads the programs
the first one compiled (cache-hit counters, not wall-clock thresholds); compile statistics."""

import os
import re

import jax
import jax.numpy as jnp

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
