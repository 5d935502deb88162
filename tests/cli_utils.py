"""Helpers to run the CLI in a subprocess, as a user would."""

import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli_env(num_devices: int = 2) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  env["PYTHONUNBUFFERED"] = "1"
  return env


def cli_command(config: str, workdir: str, *overrides: str) -> list[str]:
  return [sys.executable, "-m", "prism_jax.main", f"--config={os.path.join(REPO_ROOT, config)}",
          f"--workdir={workdir}", *overrides]


def run_cli(config: str, workdir: str, *overrides: str, timeout: int = 300, num_devices: int = 2):
  return subprocess.run(cli_command(config, workdir, *overrides), cwd=REPO_ROOT, env=cli_env(num_devices),
                        capture_output=True, text=True, timeout=timeout)
