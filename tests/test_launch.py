"""launch/*.sh: the exact commands of --dry-run, the checks made before anything runs, and live runs
against a fake gcloud that plays the VMs in local directories (scp copies there, ssh --command runs
there with /bin/sh), so the remote command lines are executed for real, quoting included.

No test reaches the cloud or needs the real gcloud; each runs the scripts in a subprocess.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_VM = os.path.join(REPO_ROOT, "launch", "tpu_vm.sh")
GPU_VM = os.path.join(REPO_ROOT, "launch", "gpu_vm.sh")
TENSORBOARD = os.path.join(REPO_ROOT, "launch", "tensorboard.sh")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="the launch scripts need bash")

PROJECT = "prism-test-project"
TPU_ZONE = "us-central2-b"
GPU_ZONE = "us-central1-a"
WORKDIR = "gs://prism-bucket/runs/quickstart"
TB_LINE = "'cd prism_jax && .venv/bin/tensorboard --logdir gs://prism-bucket/runs/quickstart/tensorboard --port 6006'"


def _jax_version() -> str:
  with open(os.path.join(REPO_ROOT, "requirements.txt")) as f:
    return next(line.split("==")[1].strip() for line in f if line.startswith("jax=="))


JAX_VERSION = _jax_version()


def sh(word: str) -> str:
  """Quotes one word the way launch/common.sh prints it."""
  if re.fullmatch(r"[A-Za-z0-9_./:=,@%+-]+", word):
    return word
  return "'" + word.replace("'", "'\\''") + "'"


def setup_line(extra: str, check: str, python: str = "python3.11") -> str:
  return ("rm -rf prism_jax/prism_jax && tar -xzf prism_jax.tar.gz && rm -f prism_jax.tar.gz && cd prism_jax"
          f' && {{ {python} -c "import ensurepip" 2>/dev/null || {{ sudo apt-get update -q'
          f" && sudo apt-get install -y -q -o DPkg::Lock::Timeout=300 {python} {python}-venv; }}; }}"
          f" && {python} -m venv .venv && .venv/bin/pip install -q --upgrade pip"
          f' && .venv/bin/pip install -q -r requirements.txt "jax[{extra}]=={JAX_VERSION}"'
          f' && .venv/bin/python -c "{check}"')


def run_line(main_args: str, log: str) -> str:
  return ("cd prism_jax && mkdir -p logs && { nohup env PYTHONUNBUFFERED=1 .venv/bin/python -m prism_jax.main "
          f'{main_args} >>{log} 2>&1 </dev/null & echo "$(hostname): started pid $! (log ~/prism_jax/{log})"; }}')


@pytest.fixture
def env(tmp_path):
  """The caller's environment without gcloud settings, with TMPDIR (where setup puts its tarball)."""
  clean = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDSDK_")}
  clean["TMPDIR"] = str(tmp_path)
  clean["CLOUDSDK_CONFIG"] = str(tmp_path / "gcloud-config")  # never the user's gcloud config
  return clean


def launch(script, *args, env, expect_rc=0):
  result = subprocess.run([script, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
  assert result.returncode == expect_rc, (result.returncode, result.stdout, result.stderr)
  return result


def dry_run(script, *args, env):
  return launch(script, *args, "--dry-run", env=env).stdout.splitlines()


# ------------------------------------------------------------------------------------------------
# --dry-run: exact commands.

TPU8 = ("--name", "prism-v4-8", "--zone", TPU_ZONE, "--project", PROJECT)
TPU8_LOC = f"--zone={TPU_ZONE} --project={PROJECT}"


def test_tpu_single_host_v4_8(env, tmp_path):
  tarball = sh(f"{tmp_path}/prism_jax-prism-v4-8.tar.gz")
  assert dry_run(TPU_VM, "create", *TPU8, "--accelerator-type", "v4-8", env=env) == [
      f"+ gcloud compute tpus tpu-vm create prism-v4-8 {TPU8_LOC} --accelerator-type=v4-8"
      " --version=tpu-ubuntu2204-base"]
  assert dry_run(TPU_VM, "setup", *TPU8, env=env) == [
      f"+ git -C {sh(REPO_ROOT)} archive --format=tar.gz --prefix=prism_jax/ --output={tarball} HEAD",
      f"+ gcloud compute tpus tpu-vm scp {tarball} prism-v4-8:prism_jax.tar.gz {TPU8_LOC} --worker=all",
      f"+ gcloud compute tpus tpu-vm ssh prism-v4-8 {TPU8_LOC} --worker=all"
      f" --command='{setup_line('tpu', 'import jax; print(jax.__version__)')}'",
      f"+ rm -f {tarball}"]
  assert dry_run(TPU_VM, "run", *TPU8, "--config", "configs/quickstart.py", "--workdir", WORKDIR,
                 "--override", "squeeze.epochs=2", env=env) == [
      f"+ gcloud compute tpus tpu-vm ssh prism-v4-8 {TPU8_LOC} --worker=all --command='"
      + run_line(f"--config=configs/quickstart.py --workdir={WORKDIR} --jax_distributed --config.squeeze.epochs=2",
                 "logs/quickstart.log") + "'"]
  assert dry_run(TPU_VM, "tensorboard", *TPU8, "--workdir", WORKDIR, env=env) == [
      f"+ gcloud compute tpus tpu-vm ssh prism-v4-8 {TPU8_LOC} --worker=0 -- -t -L 6006:localhost:6006 {TB_LINE}"]
  assert dry_run(TPU_VM, "delete", *TPU8, env=env) == [
      f"+ gcloud compute tpus tpu-vm delete prism-v4-8 {TPU8_LOC}"]


def test_tpu_pod_slice_v4_32(env):
  """A pod slice: the same command on every worker (--worker=all), no coordinator flags."""
  pod = ("--name", "prism-pod", "--zone", TPU_ZONE, "--project", PROJECT)
  loc = f"--zone={TPU_ZONE} --project={PROJECT}"
  assert dry_run(TPU_VM, "create", *pod, "--accelerator-type=v4-32", "--spot", env=env) == [
      f"+ gcloud compute tpus tpu-vm create prism-pod {loc} --accelerator-type=v4-32"
      " --version=tpu-ubuntu2204-base --spot"]
  lines = dry_run(TPU_VM, "run", *pod, "--config=configs/squeeze_cifar10.py", "--workdir=gs://prism-bucket/runs/c10/",
                  "--override", "data.tfds_data_dir=gs://prism-bucket/tfds",
                  "--override=config.teachers_dir=teachers",
                  "--override", "--config.squeeze.epochs=100",
                  "--sync-from", "gs://prism-bucket/teachers:teachers",
                  "--sync-from=gs://prism-bucket/init:data/init", env=env)
  assert lines == [
      f"+ gcloud compute tpus tpu-vm ssh prism-pod {loc} --worker=all --command='cd prism_jax"
      " && mkdir -p teachers && gcloud storage rsync -r gs://prism-bucket/teachers teachers"
      " && mkdir -p data/init && gcloud storage rsync -r gs://prism-bucket/init data/init'",
      f"+ gcloud compute tpus tpu-vm ssh prism-pod {loc} --worker=all --command='"
      + run_line("--config=configs/squeeze_cifar10.py --workdir=gs://prism-bucket/runs/c10/ --jax_distributed"
                 " --config.data.tfds_data_dir=gs://prism-bucket/tfds --config.teachers_dir=teachers"
                 " --config.squeeze.epochs=100", "logs/c10.log") + "'"]
  assert "coordinator_address" not in "\n".join(lines)
  assert dry_run(TPU_VM, "tensorboard", *pod, "--workdir", WORKDIR, "--port", "6010", env=env) == [
      f"+ gcloud compute tpus tpu-vm ssh prism-pod {loc} --worker=0 -- -t -L 6010:localhost:6010"
      " 'cd prism_jax && .venv/bin/tensorboard --logdir gs://prism-bucket/runs/quickstart/tensorboard --port 6010'"]
  assert dry_run(TPU_VM, "delete", *pod, "--yes", env=env) == [
      f"+ gcloud compute tpus tpu-vm delete prism-pod {loc} --quiet"]


@pytest.mark.parametrize("accelerator, runtime", [("v5litepod-8", "v2-alpha-tpuv5-lite"),
                                                  ("v5p-16", "v2-alpha-tpuv5"), ("v6e-8", "v2-alpha-tpuv6e")])
def test_tpu_default_runtime_per_generation(env, accelerator, runtime):
  line, = dry_run(TPU_VM, "create", *TPU8, "--accelerator-type", accelerator, env=env)
  assert line.endswith(f"--accelerator-type={accelerator} --version={runtime}")
  line, = dry_run(TPU_VM, "create", *TPU8, "--accelerator-type", accelerator, "--version", "my-runtime", env=env)
  assert line.endswith("--version=my-runtime")


GPU_IMAGE = ("--image-family=common-cu129-ubuntu-2204-nvidia-580 --image-project=deeplearning-platform-release"
             " --maintenance-policy=TERMINATE")
GPU_LOC = f"--zone={GPU_ZONE} --project={PROJECT}"
GPU_SETUP = setup_line("cuda12", "import jax; print(jax.devices())")


def test_gpu_single_vm(env, tmp_path):
  vm = ("--name", "prism-l4", "--zone", GPU_ZONE, "--project", PROJECT)
  tarball = sh(f"{tmp_path}/prism_jax-prism-l4.tar.gz")
  assert dry_run(GPU_VM, "create", *vm, "--machine-type", "g2-standard-8",
                 "--accelerator", "type=nvidia-l4,count=1", env=env) == [
      f"+ gcloud compute instances create prism-l4-0 {GPU_LOC} --machine-type=g2-standard-8"
      f" --accelerator=type=nvidia-l4,count=1 {GPU_IMAGE} --boot-disk-size=200GB --scopes=cloud-platform"
      " --metadata=install-nvidia-driver=True"]
  assert dry_run(GPU_VM, "setup", *vm, env=env) == [
      f"+ git -C {sh(REPO_ROOT)} archive --format=tar.gz --prefix=prism_jax/ --output={tarball} HEAD",
      f"+ gcloud compute scp {tarball} prism-l4-0:prism_jax.tar.gz {GPU_LOC}",
      f"+ gcloud compute ssh prism-l4-0 {GPU_LOC} --command='{GPU_SETUP}'",
      f"+ rm -f {tarball}"]
  lines = dry_run(GPU_VM, "run", *vm, "--config", "configs/quickstart.py", "--workdir", "workdirs/quickstart",
                  "--override", "squeeze.epochs=2", env=env)
  assert lines == [
      f"+ gcloud compute ssh prism-l4-0 {GPU_LOC} --command='"
      + run_line("--config=configs/quickstart.py --workdir=workdirs/quickstart --config.squeeze.epochs=2",
                 "logs/quickstart.log") + "'"]
  assert "coordinator_address" not in lines[0]
  assert dry_run(GPU_VM, "tensorboard", *vm, "--workdir", WORKDIR, env=env) == [
      f"+ gcloud compute ssh prism-l4-0 {GPU_LOC} -- -t -L 6006:localhost:6006 {TB_LINE}"]
  assert dry_run(GPU_VM, "delete", *vm, env=env) == [
      f"+ gcloud compute instances delete prism-l4-0 {GPU_LOC}"]


def test_gpu_two_vms(env, tmp_path):
  """Process i on VM NAME-i, coordinated by NAME-0; copies on every VM before any process starts."""
  vms = ("--name", "prism-h100", "--hosts", "2", "--zone", GPU_ZONE, "--project", PROJECT)
  tarball = sh(f"{tmp_path}/prism_jax-prism-h100.tar.gz")
  assert dry_run(GPU_VM, "create", *vms, "--machine-type", "a3-highgpu-1g", "--boot-disk-size", "500GB",
                 "--spot", env=env) == [
      f"+ gcloud compute instances create prism-h100-0 prism-h100-1 {GPU_LOC} --machine-type=a3-highgpu-1g"
      f" {GPU_IMAGE} --boot-disk-size=500GB --scopes=cloud-platform --metadata=install-nvidia-driver=True"
      " --provisioning-model=SPOT --instance-termination-action=STOP"]
  assert dry_run(GPU_VM, "setup", *vms, env=env) == [
      f"+ git -C {sh(REPO_ROOT)} archive --format=tar.gz --prefix=prism_jax/ --output={tarball} HEAD",
      f"+ gcloud compute scp {tarball} prism-h100-0:prism_jax.tar.gz {GPU_LOC}",
      f"+ gcloud compute ssh prism-h100-0 {GPU_LOC} --command='{GPU_SETUP}'",
      f"+ gcloud compute scp {tarball} prism-h100-1:prism_jax.tar.gz {GPU_LOC}",
      f"+ gcloud compute ssh prism-h100-1 {GPU_LOC} --command='{GPU_SETUP}'",
      f"+ rm -f {tarball}"]
  sync = ("cd prism_jax && mkdir -p teachers && gcloud storage rsync -r gs://prism-bucket/teachers teachers")
  main_args = (f"--config=configs/quickstart.py --workdir={WORKDIR} --config.squeeze.epochs=2"
               " --coordinator_address=prism-h100-0:1234 --num_processes=2 --process_id={}")
  assert dry_run(GPU_VM, "run", *vms, "--config", "configs/quickstart.py", "--workdir", WORKDIR,
                 "--override", "squeeze.epochs=2", "--sync-from", "gs://prism-bucket/teachers:teachers",
                 env=env) == [
      f"+ gcloud compute ssh prism-h100-0 {GPU_LOC} --command='{sync}'",
      f"+ gcloud compute ssh prism-h100-1 {GPU_LOC} --command='{sync}'",
      f"+ gcloud compute ssh prism-h100-0 {GPU_LOC} --command='"
      + run_line(main_args.format(0), "logs/quickstart.log") + "'",
      f"+ gcloud compute ssh prism-h100-1 {GPU_LOC} --command='"
      + run_line(main_args.format(1), "logs/quickstart.log") + "'"]
  _, line = dry_run(GPU_VM, "run", *vms, "--config", "configs/quickstart.py", "--workdir", WORKDIR,
                    "--coordinator-port", "8476", env=env)
  assert line.startswith("+ gcloud compute ssh prism-h100-1 ")
  assert " --coordinator_address=prism-h100-0:8476 --num_processes=2 --process_id=1 " in line
  assert dry_run(GPU_VM, "tensorboard", *vms, "--workdir", WORKDIR, env=env) == [
      f"+ gcloud compute ssh prism-h100-0 {GPU_LOC} -- -t -L 6006:localhost:6006 {TB_LINE}"]
  assert dry_run(GPU_VM, "delete", *vms, "--yes", env=env) == [
      f"+ gcloud compute instances delete prism-h100-0 prism-h100-1 {GPU_LOC} --quiet"]


def test_gpu_multi_vm_local_workdir_warns(env):
  result = launch(GPU_VM, "run", "--name", "g", "--hosts", "2", "--zone", GPU_ZONE, "--config",
                  "configs/quickstart.py", "--workdir", "workdirs/q", "--dry-run", env=env)
  assert "work directory should be shared (gs://...)" in result.stderr
  assert len(result.stdout.splitlines()) == 2


def test_tensorboard_helper(env):
  local_tb = os.path.join(REPO_ROOT, ".venv", "bin", "tensorboard")
  local_tb = local_tb if os.access(local_tb, os.X_OK) else "tensorboard"
  assert dry_run(TENSORBOARD, "local", "--workdir", "workdirs/quickstart", env=env) == [
      f"+ {sh(local_tb)} --logdir workdirs/quickstart/tensorboard --port 6006"]
  assert dry_run(TENSORBOARD, "tunnel", "--host", "me@gpu-box", "--workdir", "/data/runs/a/", "--port", "6007",
                 env=env) == [
      "+ ssh -t -L 6007:localhost:6007 me@gpu-box"
      " 'cd prism_jax && .venv/bin/tensorboard --logdir /data/runs/a/tensorboard --port 6007'"]
  assert dry_run(TENSORBOARD, "tunnel", "--host", "box", "--workdir", "w", "--remote-dir", "src/prism jax",
                 env=env) == [
      "+ ssh -t -L 6006:localhost:6006 box"
      " 'cd '\\''src/prism jax'\\'' && .venv/bin/tensorboard --logdir w/tensorboard --port 6006'"]


# ------------------------------------------------------------------------------------------------
# Checks before anything runs.

def restricted_path(tmp_path) -> str:
  """A PATH with bash and a few coreutils only: no gcloud, git or python."""
  bin_dir = tmp_path / "restricted-bin"
  bin_dir.mkdir()
  for tool in ("bash", "env", "cat", "cp", "dirname", "ls", "mkdir", "rm"):
    found = shutil.which(tool)
    if found:
      os.symlink(found, bin_dir / tool)
  return str(bin_dir)


def test_dry_run_needs_neither_gcloud_nor_project(env, tmp_path):
  env["PATH"] = restricted_path(tmp_path)
  result = launch(TPU_VM, "create", "--name", "t", "--zone", TPU_ZONE, "--accelerator-type", "v4-8",
                  "--dry-run", env=env)
  assert result.stdout == (f"+ gcloud compute tpus tpu-vm create t --zone={TPU_ZONE} --project=PROJECT_ID"
                           " --accelerator-type=v4-8 --version=tpu-ubuntu2204-base\n")
  assert "--project=PROJECT_ID" in result.stderr
  env["CLOUDSDK_CORE_PROJECT"] = "from-env"
  env["CLOUDSDK_COMPUTE_ZONE"] = "europe-west4-a"
  line, = dry_run(GPU_VM, "delete", "--name", "g", env=env)
  assert line == "+ gcloud compute instances delete g-0 --zone=europe-west4-a --project=from-env"


@pytest.mark.parametrize("script, args", [
    (TPU_VM, ("create", "--name", "t", "--accelerator-type", "v4-8")),
    (TPU_VM, ("setup", "--name", "t")),
    (GPU_VM, ("run", "--name", "g", "--hosts", "2", "--config", "configs/quickstart.py", "--workdir", WORKDIR)),
    (GPU_VM, ("delete", "--name", "g")),
])
def test_missing_gcloud_stops_before_anything_runs(env, tmp_path, script, args):
  env["PATH"] = restricted_path(tmp_path)
  result = launch(script, *args, "--zone", GPU_ZONE, "--project", PROJECT, env=env, expect_rc=1)
  assert "gcloud (the Google Cloud CLI) is not installed or not on PATH" in result.stderr
  assert "https://cloud.google.com/sdk/docs/install" in result.stderr
  assert "--dry-run" in result.stderr
  assert result.stdout == "" and "+ " not in result.stderr
  assert not list(tmp_path.glob("*.tar.gz"))  # setup's git archive did not run


FAKE_GCLOUD = """\
#!{python}
# A fake gcloud: logs its arguments; `scp SRC HOST:DEST` copies into $FAKE_VM_ROOT/HOST; `ssh HOST
# --command=CMD` runs CMD with /bin/sh (POSIX only) in $FAKE_VM_ROOT/HOST, the VM's home directory.
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as log:
  log.write(json.dumps(args) + "\\n")
if args[:3] == ["config", "get-value", "project"]:
  print(os.environ.get("FAKE_GCLOUD_PROJECT", ""))
elif "scp" in args:
  i = args.index("scp")
  host, path = args[i + 2].split(":", 1)
  home = os.path.join(os.environ["FAKE_VM_ROOT"], host)
  os.makedirs(home, exist_ok=True)
  shutil.copy(args[i + 1], os.path.join(home, path))
elif "ssh" in args:
  host = args[args.index("ssh") + 1]
  home = os.path.join(os.environ["FAKE_VM_ROOT"], host)
  os.makedirs(home, exist_ok=True)
  for arg in args:
    if arg.startswith("--command="):
      sys.exit(subprocess.run(["/bin/sh", "-c", arg[len("--command="):]], cwd=home).returncode)
"""

# python3.11 on the fake VMs: `-m venv DIR` makes DIR/bin/{{python,pip}} that log their arguments
# to DIR/calls.jsonl (nothing is installed, prism_jax.main is not started).
FAKE_PYTHON = """\
#!{python}
import json, os, sys
args = sys.argv[1:]
if args == ["-c", "import ensurepip"]:
  sys.exit(0)
assert args[:2] == ["-m", "venv"], args
venv = os.path.abspath(args[2])
os.makedirs(os.path.join(venv, "bin"))
for tool in ("python", "pip"):
  path = os.path.join(venv, "bin", tool)
  with open(path, "w") as f:
    f.write("#!{python}\\nimport json, sys\\n"
            f"open({{os.path.join(venv, 'calls.jsonl')!r}}, 'a').write(json.dumps([{{tool!r}}] + sys.argv[1:]) + '\\\\n')\\n")
  os.chmod(path, 0o755)
"""


@pytest.fixture
def fake_cloud(env, tmp_path):
  """env with a fake gcloud (and python3.11 for the fake VMs) first on PATH."""
  bin_dir = tmp_path / "fake-bin"
  bin_dir.mkdir()
  for name, text in (("gcloud", FAKE_GCLOUD), ("python3.11", FAKE_PYTHON)):
    (bin_dir / name).write_text(text.format(python=sys.executable))
    (bin_dir / name).chmod(0o755)
  (tmp_path / "vms").mkdir()
  env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
  env["FAKE_GCLOUD_LOG"] = str(tmp_path / "gcloud.jsonl")
  env["FAKE_VM_ROOT"] = str(tmp_path / "vms")
  return env


def gcloud_calls(env):
  if not os.path.exists(env["FAKE_GCLOUD_LOG"]):
    return []
  with open(env["FAKE_GCLOUD_LOG"]) as f:
    return [json.loads(line) for line in f]


def test_missing_project_stops_before_anything_runs(fake_cloud):
  result = launch(TPU_VM, "create", "--name", "t", "--zone", TPU_ZONE, "--accelerator-type", "v4-8",
                  env=fake_cloud, expect_rc=1)
  assert "no Google Cloud project is set" in result.stderr
  assert "--project PROJECT_ID" in result.stderr and "gcloud config set project PROJECT_ID" in result.stderr
  assert result.stdout == "" and "+ " not in result.stderr
  assert gcloud_calls(fake_cloud) == [["config", "get-value", "project"]]


def test_live_run_executes_what_dry_run_prints(fake_cloud):
  """The project comes from gcloud's config; the argv gcloud receives equals the dry-run lines."""
  fake_cloud["FAKE_GCLOUD_PROJECT"] = "from-gcloud-config"
  args = ("delete", "--name", "g", "--hosts", "3", "--zone", GPU_ZONE, "--yes")
  launch(GPU_VM, *args, env=fake_cloud)
  printed = dry_run(GPU_VM, *args, "--project", "from-gcloud-config", env=fake_cloud)
  assert gcloud_calls(fake_cloud) == [["config", "get-value", "project"]] + [
      shlex.split(line[2:])[1:] for line in printed]
  assert printed == [f"+ gcloud compute instances delete g-0 g-1 g-2 --zone={GPU_ZONE}"
                     " --project=from-gcloud-config --quiet"]


@pytest.mark.skipif(not os.path.isdir(os.path.join(REPO_ROOT, ".git")) or shutil.which("git") is None,
                    reason="setup archives the git repository")
def test_setup_with_unknown_ref_stops_before_copying(fake_cloud, tmp_path):
  result = launch(TPU_VM, "setup", "--name", "t", "--zone", TPU_ZONE, "--project", PROJECT, "--ref", "no-such-ref",
                  env=fake_cloud, expect_rc=1)
  assert "--ref no-such-ref is not a commit of" in result.stderr and "+ " not in result.stderr
  assert gcloud_calls(fake_cloud) == [] and not list(tmp_path.glob("*.tar.gz"))


def wait_for_lines(path, count, timeout=20.0):
  """The runs are started with nohup in the background: wait for their stub to log."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if os.path.exists(path):
      with open(path) as f:
        lines = [json.loads(line) for line in f if line.endswith("\n")]
      if len(lines) >= count:
        return lines
    time.sleep(0.05)
  raise AssertionError(f"{path}: fewer than {count} calls after {timeout}s")


@pytest.mark.skipif(not os.path.isdir(os.path.join(REPO_ROOT, ".git")) or shutil.which("git") is None,
                    reason="setup archives the git repository")
def test_two_gpu_vms_setup_and_run_on_fake_vms(fake_cloud, tmp_path):
  """setup unpacks HEAD and installs into a venv on each VM; run starts process i of 2 on VM i with
  the overrides intact through two levels of shell quoting; data is synced first."""
  vms = ("--name", "fake", "--hosts", "2", "--zone", GPU_ZONE, "--project", PROJECT)
  launch(GPU_VM, "setup", *vms, env=fake_cloud)
  assert not list(tmp_path.glob("*.tar.gz"))
  for host in ("fake-0", "fake-1"):
    repo = tmp_path / "vms" / host / "prism_jax"
    assert (repo / "requirements.txt").is_file() and (repo / "prism_jax" / "main.py").is_file()
    assert not (tmp_path / "vms" / host / "prism_jax.tar.gz").exists()
    assert wait_for_lines(repo / ".venv" / "calls.jsonl", 3) == [
        ["pip", "install", "-q", "--upgrade", "pip"],
        ["pip", "install", "-q", "-r", "requirements.txt", f"jax[cuda12]=={JAX_VERSION}"],
        ["python", "-c", "import jax; print(jax.devices())"]]

  overrides = ("squeeze.epochs=2", 'recover.bn_pool=("mobilenet_v2", "alexnet")', "data.name=it's")
  run_args = ["run", *vms, "--config", "configs/quickstart.py", "--workdir", "gs://b/run one",
              "--sync-from", "gs://b/teachers:teachers"]
  for override in overrides:
    run_args += ["--override", override]
  result = launch(GPU_VM, *run_args, env=fake_cloud)
  assert result.stdout.count(": started pid ") == 2
  # The copies (the VMs' own gcloud is the fake too) on every VM, then the processes.
  rsync = ["storage", "rsync", "-r", "gs://b/teachers", "teachers"]
  assert [call[:3] if call[0] == "compute" else call for call in gcloud_calls(fake_cloud)[-6:]] == [
      ["compute", "ssh", "fake-0"], rsync, ["compute", "ssh", "fake-1"], rsync,
      ["compute", "ssh", "fake-0"], ["compute", "ssh", "fake-1"]]
  for i, host in enumerate(("fake-0", "fake-1")):
    repo = tmp_path / "vms" / host / "prism_jax"
    assert (repo / "teachers").is_dir() and (repo / "logs" / "run_one.log").exists()
    main_call = wait_for_lines(repo / ".venv" / "calls.jsonl", 4)[3]
    assert main_call == [
        "python", "-m", "prism_jax.main", "--config=configs/quickstart.py", "--workdir=gs://b/run one",
        "--config.squeeze.epochs=2", '--config.recover.bn_pool=("mobilenet_v2", "alexnet")',
        "--config.data.name=it's", "--coordinator_address=fake-0:1234", "--num_processes=2",
        f"--process_id={i}"]


@pytest.mark.skipif(not os.path.isdir(os.path.join(REPO_ROOT, ".git")) or shutil.which("git") is None,
                    reason="setup archives the git repository")
def test_tpu_setup_and_run_on_fake_vm(fake_cloud, tmp_path):
  vm = ("--name", "tpu", "--zone", TPU_ZONE, "--project", PROJECT)
  launch(TPU_VM, "setup", *vm, env=fake_cloud)
  launch(TPU_VM, "run", *vm, "--config", "configs/quickstart.py", "--workdir", "workdirs/q",
         "--override", "squeeze.epochs=1", env=fake_cloud)
  calls = wait_for_lines(tmp_path / "vms" / "tpu" / "prism_jax" / ".venv" / "calls.jsonl", 4)
  assert calls[1] == ["pip", "install", "-q", "-r", "requirements.txt", f"jax[tpu]=={JAX_VERSION}"]
  assert calls[3] == ["python", "-m", "prism_jax.main", "--config=configs/quickstart.py", "--workdir=workdirs/q", "--jax_distributed",
                      "--config.squeeze.epochs=1"]
  assert all("--worker=all" in call for call in gcloud_calls(fake_cloud) if "ssh" in call or "scp" in call)


# ------------------------------------------------------------------------------------------------
# Usage errors: exit status 2, a message naming the problem, the usage text; nothing on stdout.

COMMON = ("--name", "n", "--zone", TPU_ZONE, "--dry-run")


@pytest.mark.parametrize("script, args, message", [
    (TPU_VM, (), "expected one subcommand (create, setup, run, tensorboard, delete), got 0"),
    (TPU_VM, ("launch", *COMMON), "unknown subcommand 'launch'"),
    (TPU_VM, ("create", "--zone", TPU_ZONE, "--accelerator-type", "v4-8"), "create needs --name"),
    (TPU_VM, ("create", "--name", "n", "--accelerator-type", "v4-8"), "create needs --zone"),
    (TPU_VM, ("create", *COMMON), "create needs --accelerator-type"),
    (TPU_VM, ("create", *COMMON, "--accelerator-type", "tpu8"), "--accelerator-type must look like v4-8"),
    (TPU_VM, ("create", *COMMON, "--accelerator-type", "v7x-8"), "no default runtime for v7x-8: pass --version"),
    (TPU_VM, ("create", "--name", "Bad_Name", "--zone", TPU_ZONE, "--accelerator-type", "v4-8"),
     "--name must start with a lowercase letter"),
    (TPU_VM, ("run", *COMMON, "--workdir", "w"), "run needs --config"),
    (TPU_VM, ("run", *COMMON, "--config", "configs/quickstart.py"), "run needs --workdir"),
    (TPU_VM, ("run", *COMMON, "--config", "configs/nope.py", "--workdir", "w"),
     "--config configs/nope.py is not a file of the repository"),
    (TPU_VM, ("run", *COMMON, "--config", "configs/quickstart.py", "--workdir", "w", "--override", "epochs"),
     "--override must be FIELD=VALUE"),
    (TPU_VM, ("run", *COMMON, "--config", "configs/quickstart.py", "--workdir", "w", "--sync-from", "gs://b/x"),
     "--sync-from must be GS_PATH:LOCAL_DIR"),
    (TPU_VM, ("run", *COMMON, "--config", "configs/quickstart.py", "--workdir", "w", "--sync-from", "/b:x"),
     "--sync-from must be GS_PATH:LOCAL_DIR"),
    (TPU_VM, ("run", *COMMON, "--config", "configs/quickstart.py", "--workdir", "w", "--spot"),
     "run does not take --spot"),
    (TPU_VM, ("tensorboard", *COMMON), "tensorboard needs --workdir"),
    (TPU_VM, ("tensorboard", *COMMON, "--workdir", "w", "--port", "99999"), "--port must be an integer"),
    (TPU_VM, ("delete", *COMMON, "--bogus"), "unknown flag --bogus"),
    (TPU_VM, ("delete", *COMMON, "--name"), "--name needs a value"),
    (TPU_VM, ("delete", *COMMON, "--yes=1"), "--yes takes no value"),
    (TPU_VM, ("delete", "extra", *COMMON), "expected one subcommand"),
    (GPU_VM, ("create", *COMMON), "create needs --machine-type"),
    (GPU_VM, ("create", *COMMON, "--machine-type", "g2-standard-8", "--accelerator", "nvidia-l4"),
     "--accelerator must be type=GPU_TYPE,count=N"),
    (GPU_VM, ("run", *COMMON, "--hosts", "0", "--config", "configs/quickstart.py", "--workdir", "w"),
     "--hosts must be an integer in [1, 64]"),
    (GPU_VM, ("run", *COMMON, "--config", "configs/quickstart.py", "--workdir", "w", "--coordinator-port", "x"),
     "--coordinator-port must be an integer"),
    (GPU_VM, ("setup", *COMMON, "--python", "python 3"), "--python must be an interpreter name or path"),
    (TENSORBOARD, ("local", "--dry-run"), "local needs --workdir"),
    (TENSORBOARD, ("tunnel", "--workdir", "w", "--dry-run"), "tunnel needs --host"),
    (TENSORBOARD, ("remote", "--workdir", "w"), "unknown subcommand 'remote'"),
])
def test_usage_errors(env, script, args, message):
  result = launch(script, *args, env=env, expect_rc=2)
  assert message in result.stderr
  assert f"usage: launch/{os.path.basename(script)}" in result.stderr
  assert result.stdout == ""


@pytest.mark.parametrize("script", [TPU_VM, GPU_VM, TENSORBOARD])
def test_help(env, script):
  result = launch(script, "--help", env=env)
  assert result.stdout.startswith(f"usage: launch/{os.path.basename(script)}") and result.stderr == ""


def test_scripts_are_executable():
  for script in (TPU_VM, GPU_VM, TENSORBOARD):
    assert os.access(script, os.X_OK), script
