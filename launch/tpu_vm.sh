#!/usr/bin/env bash
# Cloud TPU VMs (one host such as v4-8, or a multi-host pod slice such as v4-32) for prism_jax:
# create the VM, copy the repository and install it on every worker, start a run on every worker,
# open TensorBoard through an ssh tunnel, delete the VM. See launch/README.md.
#
# Every worker runs the same command; on a pod slice jax.distributed.initialize() finds the other
# workers by itself, so no coordinator flags are passed.
set -euo pipefail

case ${BASH_SOURCE[0]} in
  */*) LAUNCH_DIR=${BASH_SOURCE[0]%/*} ;;
  *) LAUNCH_DIR=. ;;
esac
PROG=${0##*/}
# shellcheck source=launch/common.sh
source "${LAUNCH_DIR}/common.sh"

USAGE="usage: launch/tpu_vm.sh SUBCOMMAND --name NAME --zone ZONE [--project PROJECT] [--dry-run] [flags]

subcommands and their flags:
  create       --accelerator-type TYPE (v4-8, v4-32, v5litepod-8, v5p-8, v6e-8, ...)
               [--version RUNTIME] (default from TYPE: tpu-ubuntu2204-base for v2-v4,
               v2-alpha-tpuv5-lite, v2-alpha-tpuv5, v2-alpha-tpuv6e) [--spot]
  setup        [--ref COMMIT] (default HEAD) [--python PYTHON] (default python3.11)
               git archive of the repository -> ~/prism_jax on every worker, venv, pip install
               -r requirements.txt \"jax[tpu]==<pinned version>\"
  run          --config CONFIG --workdir WORKDIR [--override FIELD=VALUE ...]
               [--sync-from GS_PATH:LOCAL_DIR ...]
               starts python -m prism_jax.main on every worker, detached (nohup), output appended
               to ~/prism_jax/logs/<workdir name>.log; relative paths are relative to ~/prism_jax
  tensorboard  --workdir WORKDIR [--port PORT] (default 6006)
               ssh tunnel to worker 0 running TensorBoard on WORKDIR/tensorboard
  delete       [--yes] (skip gcloud's confirmation)

common flags:
  --name NAME        TPU VM name
  --zone ZONE        or CLOUDSDK_COMPUTE_ZONE
  --project PROJECT  or CLOUDSDK_CORE_PROJECT, or 'gcloud config get-value project'
  --dry-run          print each command as '+ <command>' on stdout and run nothing
                     (needs neither gcloud nor a project)"

usage() {
  printf '%s\n' "$USAGE"
}

FLAG_SPEC="name= zone= project= dry-run accelerator-type= version= spot ref= python= config= workdir=
override+ sync-from+ port= yes"
FLAG_SPEC=${FLAG_SPEC//$'\n'/ }
COMMON_FLAGS="name zone project dry-run"
opt_name="" opt_zone="" opt_project="" opt_dry_run="" opt_accelerator_type="" opt_version=""
opt_spot="" opt_ref="" opt_python="" opt_config="" opt_workdir="" opt_port="" opt_yes=""
opt_override=()
opt_sync_from=()

# The runtime (software version) Google recommends for JAX on each TPU generation.
default_runtime() {
  case $1 in
    v6e-*) printf 'v2-alpha-tpuv6e' ;;
    v5p-*) printf 'v2-alpha-tpuv5' ;;
    v5litepod-* | v5e-*) printf 'v2-alpha-tpuv5-lite' ;;
    v2-* | v3-* | v4-*) printf 'tpu-ubuntu2204-base' ;;
    *) return 1 ;;
  esac
}

tpu_vm() {
  run_cmd gcloud compute tpus tpu-vm "$@"
}

cmd_create() {
  local type_re='^v[0-9]+[a-z]*-[0-9]+$' version
  require_flags create accelerator-type
  [[ $opt_accelerator_type =~ $type_re ]] ||
    usage_error "--accelerator-type must look like v4-8 or v5litepod-16, got '${opt_accelerator_type}'"
  version=$opt_version
  if [[ -z $version ]]; then
    version=$(default_runtime "$opt_accelerator_type") ||
      usage_error "no default runtime for ${opt_accelerator_type}: pass --version"
  fi
  check_cloud_environment
  local spot=()
  [[ -z $opt_spot ]] || spot=(--spot)
  tpu_vm create "$opt_name" "--zone=${ZONE}" "--project=${PROJECT}" \
    "--accelerator-type=${opt_accelerator_type}" "--version=${version}" ${spot[@]+"${spot[@]}"}
}

cmd_setup() {
  local ref=${opt_ref:-HEAD} python=${opt_python:-python3.11} tarball setup_line
  check_python_name "$python"
  # Only the version is printed: initializing the TPUs of one worker would wait for the others.
  setup_line=$(remote_setup_command "$python" tpu "import jax; print(jax.__version__)")
  check_cloud_environment
  [[ $DRY_RUN == 1 ]] || warn_if_dirty "$ref"
  tarball=$(tarball_path "$opt_name")
  make_tarball "$tarball" "$ref"
  tpu_vm scp "$tarball" "${opt_name}:${REMOTE_REPO_DIR}.tar.gz" "--zone=${ZONE}" "--project=${PROJECT}" \
    --worker=all
  tpu_vm ssh "$opt_name" "--zone=${ZONE}" "--project=${PROJECT}" --worker=all "--command=${setup_line}"
  run_cmd rm -f "$tarball"
}

cmd_run() {
  local sync_line run_line
  require_flags run config workdir
  check_config_path "$opt_config"
  parse_overrides ${opt_override[@]+"${opt_override[@]}"}
  parse_sync_specs ${opt_sync_from[@]+"${opt_sync_from[@]}"}
  sync_line=$(remote_sync_command)
  run_line=$(remote_run_command "$(log_file_for "$opt_workdir")" "--config=${opt_config}" \
    "--workdir=${opt_workdir}" --jax_distributed ${CONFIG_OVERRIDES[@]+"${CONFIG_OVERRIDES[@]}"})
  check_cloud_environment
  if [[ -n $sync_line ]]; then
    tpu_vm ssh "$opt_name" "--zone=${ZONE}" "--project=${PROJECT}" --worker=all "--command=${sync_line}"
  fi
  tpu_vm ssh "$opt_name" "--zone=${ZONE}" "--project=${PROJECT}" --worker=all "--command=${run_line}"
}

cmd_tensorboard() {
  local port=${opt_port:-6006} tensorboard_line
  require_flags tensorboard workdir
  check_int_range port "$port" 1 65535
  tensorboard_line=$(remote_tensorboard_command "$opt_workdir" "$port")
  check_cloud_environment
  tpu_vm ssh "$opt_name" "--zone=${ZONE}" "--project=${PROJECT}" --worker=0 -- \
    -t -L "${port}:localhost:${port}" "$tensorboard_line"
}

cmd_delete() {
  check_cloud_environment
  local quiet=()
  [[ -z $opt_yes ]] || quiet=(--quiet)
  tpu_vm delete "$opt_name" "--zone=${ZONE}" "--project=${PROJECT}" ${quiet[@]+"${quiet[@]}"}
}

main() {
  start_subcommand \
    "create:${COMMON_FLAGS} accelerator-type version spot" \
    "setup:${COMMON_FLAGS} ref python" \
    "run:${COMMON_FLAGS} config workdir override sync-from" \
    "tensorboard:${COMMON_FLAGS} workdir port" \
    "delete:${COMMON_FLAGS} yes" -- "$@"
  local subcommand=$SUBCOMMAND
  require_flags "$subcommand" name
  check_resource_name "$opt_name" 63
  resolve_zone "$subcommand"
  "cmd_${subcommand}"
}

main "$@"
