"""Helpers to run the CLI in a subprocess, as a user would, alone or as cooperating processes."""

import importlib.util
import os
import socket
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


HIDE_MODULES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hide_modules")


def cli_env(num_devices: int = 2, hide_modules: tuple[str, ...] = ()) -> dict:
  """The environment of a CLI subprocess on `num_devices` CPU devices, with the session's XLA settings
  (conftest.py: most optimizations off, so its results match the in-process runs').
  `hide_modules` makes those packages unimportable in the subprocess (tests/hide_modules)."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
  if hide_modules:
    env["PYTHONPATH"] = HIDE_MODULES_DIR + os.pathsep + env["PYTHONPATH"]
    env["PRISM_HIDE_MODULES"] = ",".join(hide_modules)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  env["PYTHONUNBUFFERED"] = "1"
  if "PRISM_TEST_XLA_CACHE" in env:  # set by conftest.py: shared by this session's CLI runs
    env["JAX_COMPILATION_CACHE_DIR"] = env["PRISM_TEST_XLA_CACHE"]
  return env


def cli_command(config: str, workdir: str, *overrides: str) -> list[str]:
  return [sys.executable, "-m", "prism_jax.main", f"--config={os.path.join(REPO_ROOT, config)}",
          f"--workdir={workdir}", *overrides]


def run_cli(config: str, workdir: str, *overrides: str, timeout: int = 300, num_devices: int = 2,
            hide_modules: tuple[str, ...] = ()):
  return subprocess.run(cli_command(config, workdir, *overrides), cwd=REPO_ROOT,
                        env=cli_env(num_devices, hide_modules=hide_modules),
                        capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_processes(config_path: str, workdirs: list[str], *overrides: str, devices_per_process: int = 2,
                  timeout: int = 180, check: bool = True) -> list[str]:
  """Runs the CLI as one cooperating JAX process per work directory (a localhost coordinator, CPU
  devices); returns their outputs. With `check`, a failing or stuck process fails the test with
  every output; without, a stuck one still does."""
  env = cli_env(devices_per_process)
  env["JAX_PLATFORMS"] = "cpu"
  coordinator = f"--coordinator_address=localhost:{free_port()}"
  procs = [subprocess.Popen(cli_command(config_path, workdir, coordinator, f"--num_processes={len(workdirs)}",
                                        f"--process_id={i}", *overrides),
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i, workdir in enumerate(workdirs)]
  outputs = []
  for p in procs:
    try:
      outputs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
      for q in procs:  # a stuck or failed process leaves the others waiting on it
        q.kill()
      outputs = [q.communicate()[0] for q in procs]
      pytest.fail(f"{len(workdirs)} processes still running after {timeout} s; outputs:\n" +
                  "\n".join(f"--- process {j} ---\n{o[-3000:]}" for j, o in enumerate(outputs)))
  for i, (p, out) in enumerate(zip(procs, outputs)):
    if check and p.returncode != 0:
      pytest.fail(f"process {i} of {len(workdirs)} failed (exit {p.returncode}); outputs:\n" +
                  "\n".join(f"--- process {j} ---\n{o[-3000:]}" for j, o in enumerate(outputs)))
  return outputs


def load_config(config_path: str):
  """get_config() of a config file outside the configs/ package (written by a test)."""
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(config_path))[0], config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()
