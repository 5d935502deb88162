#!/usr/bin/env bash
# Compute Engine GPU VMs for prism_jax: create --hosts VMs named NAME-0 .. NAME-(N-1) from a Deep
# Learning VM image (CUDA 12 driver), copy the repository and install it on each, start one process
# per VM, open TensorBoard through an ssh tunnel to NAME-0, delete the VMs. See launch/README.md.
#
# With several VMs, process i runs on NAME-i with --coordinator_address NAME-0:PORT
# --num_processes N --process_id i; VM names resolve through the VPC's internal DNS, and the default
# network's firewall lets the VMs reach each other.
set -euo pipefail

case ${BASH_SOURCE[0]} in
  */*) LAUNCH_DIR=${BASH_SOURCE[0]%/*} ;;
  *) LAUNCH_DIR=. ;;
esac
PROG=${0##*/}
# shellcheck source=launch/common.sh
source "${LAUNCH_DIR}/common.sh"

DEFAULT_IMAGE_FAMILY=common-cu129-ubuntu-2204-nvidia-580
IMAGE_PROJECT=deeplearning-platform-release

USAGE="usage: launch/gpu_vm.sh SUBCOMMAND --name NAME --zone ZONE [--hosts N] [--project PROJECT] [--dry-run] [flags]

subcommands and their flags:
  create       --machine-type TYPE (a3-highgpu-1g, a2-highgpu-1g, g2-standard-8, n1-standard-8, ...)
               [--accelerator type=GPU,count=N] (needed for n1; a2/a3/g2 come with their GPUs)
               [--image-family FAMILY] (default ${DEFAULT_IMAGE_FAMILY}, project ${IMAGE_PROJECT})
               [--boot-disk-size SIZE] (default 200GB) [--spot]
  setup        [--ref COMMIT] (default HEAD) [--python PYTHON] (default python3.11)
               git archive of the repository -> ~/prism_jax on every VM, venv, pip install
               -r requirements.txt \"jax[cuda12]==<pinned version>\"
  run          --config CONFIG --workdir WORKDIR [--override FIELD=VALUE ...]
               [--sync-from GS_PATH:LOCAL_DIR ...] [--coordinator-port PORT] (default 1234)
               starts python -m prism_jax.main on every VM, detached (nohup), output appended to
               ~/prism_jax/logs/<workdir name>.log; relative paths are relative to ~/prism_jax
  tensorboard  --workdir WORKDIR [--port PORT] (default 6006)
               ssh tunnel to NAME-0 running TensorBoard on WORKDIR/tensorboard
  delete       [--yes] (skip gcloud's confirmation)

common flags:
  --name NAME        VM name prefix: the VMs are NAME-0 .. NAME-(N-1)
  --hosts N          number of VMs (default 1)
  --zone ZONE        or CLOUDSDK_COMPUTE_ZONE
  --project PROJECT  or CLOUDSDK_CORE_PROJECT, or 'gcloud config get-value project'
  --dry-run          print each command as '+ <command>' on stdout and run nothing
                     (needs neither gcloud nor a project)"

usage() {
  printf '%s\n' "$USAGE"
}

FLAG_SPEC="name= zone= project= dry-run hosts= machine-type= accelerator= image-family= boot-disk-size=
spot ref= python= config= workdir= override+ sync-from+ coordinator-port= port= yes"
FLAG_SPEC=${FLAG_SPEC//$'\n'/ }
COMMON_FLAGS="name zone project dry-run hosts"
opt_name="" opt_zone="" opt_project="" opt_dry_run="" opt_hosts="" opt_machine_type="" opt_accelerator=""
opt_image_family="" opt_boot_disk_size="" opt_spot="" opt_ref="" opt_python="" opt_config="" opt_workdir=""
opt_coordinator_port="" opt_port="" opt_yes=""
opt_override=()
opt_sync_from=()

# VM_NAMES: NAME-0 .. NAME-(HOSTS-1).
set_vm_names() {
  local i
  VM_NAMES=()
  for ((i = 0; i < HOSTS; i++)); do
    VM_NAMES+=("${opt_name}-${i}")
  done
}

cmd_create() {
  local extra=()
  require_flags create machine-type
  [[ $opt_machine_type =~ ^[a-z0-9]+(-[a-z0-9]+)+$ ]] ||
    usage_error "--machine-type must look like g2-standard-8, got '${opt_machine_type}'"
  if [[ -n $opt_accelerator ]]; then
    [[ $opt_accelerator =~ ^type=[a-z0-9-]+,count=[1-9][0-9]*$ ]] ||
      usage_error "--accelerator must be type=GPU_TYPE,count=N (e.g. type=nvidia-l4,count=1), got '${opt_accelerator}'"
    extra+=("--accelerator=${opt_accelerator}")
  fi
  [[ ${opt_boot_disk_size:-200GB} =~ ^[0-9]+(GB|TB)$ ]] ||
    usage_error "--boot-disk-size must look like 200GB, got '${opt_boot_disk_size}'"
  check_cloud_environment
  # Scope cloud-platform lets the VM's service account read and write gs:// work directories (what
  # it may access is then decided by its IAM roles; the default scopes only read storage).
  extra+=("--image-family=${opt_image_family:-$DEFAULT_IMAGE_FAMILY}" "--image-project=${IMAGE_PROJECT}"
    --maintenance-policy=TERMINATE "--boot-disk-size=${opt_boot_disk_size:-200GB}"
    --scopes=cloud-platform --metadata=install-nvidia-driver=True)
  if [[ -n $opt_spot ]]; then
    extra+=(--provisioning-model=SPOT --instance-termination-action=STOP)
  fi
  run_cmd gcloud compute instances create "${VM_NAMES[@]}" "--zone=${ZONE}" "--project=${PROJECT}" \
    "--machine-type=${opt_machine_type}" "${extra[@]}"
}

cmd_setup() {
  local ref=${opt_ref:-HEAD} python=${opt_python:-python3.11} tarball setup_line name
  check_python_name "$python"
  setup_line=$(remote_setup_command "$python" cuda12 "import jax; print(jax.devices())")
  check_cloud_environment
  [[ $DRY_RUN == 1 ]] || warn_if_dirty "$ref"
  tarball=$(tarball_path "$opt_name")
  make_tarball "$tarball" "$ref"
  for name in "${VM_NAMES[@]}"; do
    run_cmd gcloud compute scp "$tarball" "${name}:${REMOTE_REPO_DIR}.tar.gz" "--zone=${ZONE}" \
      "--project=${PROJECT}"
    run_cmd gcloud compute ssh "$name" "--zone=${ZONE}" "--project=${PROJECT}" "--command=${setup_line}"
  done
  run_cmd rm -f "$tarball"
}

cmd_run() {
  local port=${opt_coordinator_port:-1234} sync_line log_file i run_lines=() coordinator=()
  require_flags run config workdir
  check_config_path "$opt_config"
  check_int_range coordinator-port "$port" 1 65535
  parse_overrides ${opt_override[@]+"${opt_override[@]}"}
  parse_sync_specs ${opt_sync_from[@]+"${opt_sync_from[@]}"}
  sync_line=$(remote_sync_command)
  log_file=$(log_file_for "$opt_workdir")
  for ((i = 0; i < HOSTS; i++)); do
    if [[ $HOSTS -gt 1 ]]; then
      coordinator=("--coordinator_address=${opt_name}-0:${port}" "--num_processes=${HOSTS}" "--process_id=${i}")
    fi
    run_lines+=("$(remote_run_command "$log_file" "--config=${opt_config}" "--workdir=${opt_workdir}" \
      ${CONFIG_OVERRIDES[@]+"${CONFIG_OVERRIDES[@]}"} ${coordinator[@]+"${coordinator[@]}"})")
  done
  if [[ $HOSTS -gt 1 && $opt_workdir != gs://* ]]; then
    warn "with ${HOSTS} VMs the work directory should be shared (gs://...): each VM writes its own" \
      "${opt_workdir}, and checkpoints need every process to see the same directory"
  fi
  check_cloud_environment
  # All copies first, then the processes, which wait for each other only at start-up.
  if [[ -n $sync_line ]]; then
    for ((i = 0; i < HOSTS; i++)); do
      run_cmd gcloud compute ssh "${VM_NAMES[i]}" "--zone=${ZONE}" "--project=${PROJECT}" "--command=${sync_line}"
    done
  fi
  for ((i = 0; i < HOSTS; i++)); do
    run_cmd gcloud compute ssh "${VM_NAMES[i]}" "--zone=${ZONE}" "--project=${PROJECT}" "--command=${run_lines[i]}"
  done
}

cmd_tensorboard() {
  local port=${opt_port:-6006} tensorboard_line
  require_flags tensorboard workdir
  check_int_range port "$port" 1 65535
  tensorboard_line=$(remote_tensorboard_command "$opt_workdir" "$port")
  check_cloud_environment
  run_cmd gcloud compute ssh "${VM_NAMES[0]}" "--zone=${ZONE}" "--project=${PROJECT}" -- \
    -t -L "${port}:localhost:${port}" "$tensorboard_line"
}

cmd_delete() {
  local quiet=()
  check_cloud_environment
  [[ -z $opt_yes ]] || quiet=(--quiet)
  run_cmd gcloud compute instances delete "${VM_NAMES[@]}" "--zone=${ZONE}" "--project=${PROJECT}" \
    ${quiet[@]+"${quiet[@]}"}
}

main() {
  start_subcommand \
    "create:${COMMON_FLAGS} machine-type accelerator image-family boot-disk-size spot" \
    "setup:${COMMON_FLAGS} ref python" \
    "run:${COMMON_FLAGS} config workdir override sync-from coordinator-port" \
    "tensorboard:${COMMON_FLAGS} workdir port" \
    "delete:${COMMON_FLAGS} yes" -- "$@"
  local subcommand=$SUBCOMMAND
  require_flags "$subcommand" name
  HOSTS=${opt_hosts:-1}
  check_int_range hosts "$HOSTS" 1 64
  HOSTS=$((10#$HOSTS))
  # Room for the -<index> suffix within the 63-character limit.
  check_resource_name "$opt_name" $((63 - 1 - ${#HOSTS}))
  set_vm_names
  resolve_zone "$subcommand"
  "cmd_${subcommand}"
}

main "$@"
