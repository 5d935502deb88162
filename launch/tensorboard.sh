#!/usr/bin/env bash
# TensorBoard for a prism_jax work directory: on this machine (`local`), or on any host reached with
# plain ssh (`tunnel`: TensorBoard runs there, its port is forwarded here). Cloud VMs made by
# tpu_vm.sh / gpu_vm.sh have their own `tensorboard` subcommand that goes through gcloud.
set -euo pipefail

case ${BASH_SOURCE[0]} in
  */*) LAUNCH_DIR=${BASH_SOURCE[0]%/*} ;;
  *) LAUNCH_DIR=. ;;
esac
PROG=${0##*/}
# shellcheck source=launch/common.sh
source "${LAUNCH_DIR}/common.sh"

USAGE="usage: launch/tensorboard.sh local --workdir WORKDIR [--port PORT] [--dry-run]
       launch/tensorboard.sh tunnel --host [USER@]HOST --workdir WORKDIR [--port PORT]
                                    [--remote-dir DIR] [--dry-run]

  local   tensorboard --logdir WORKDIR/tensorboard --port PORT, with the repository's
          .venv/bin/tensorboard when there is one, else the tensorboard on PATH
  tunnel  ssh -t -L PORT:localhost:PORT HOST 'cd DIR && .venv/bin/tensorboard --logdir
          WORKDIR/tensorboard --port PORT'; DIR (default prism_jax, relative to the remote home)
          holds the repository and its venv, and a relative WORKDIR is relative to it

  --port PORT  default 6006; open http://localhost:PORT
  --dry-run    print the command as '+ <command>' on stdout and run nothing
WORKDIR may be a gs:// path (TensorBoard reads it with the credentials of the machine it runs on)."

usage() {
  printf '%s\n' "$USAGE"
}

FLAG_SPEC="workdir= port= host= remote-dir= dry-run"
opt_workdir="" opt_port="" opt_host="" opt_remote_dir="" opt_dry_run=""

cmd_local() {
  local tensorboard=${PRISM_REPO_ROOT}/.venv/bin/tensorboard
  if [[ ! -x $tensorboard ]]; then
    tensorboard=tensorboard
    if [[ $DRY_RUN == 0 ]] && ! command -v tensorboard >/dev/null 2>&1; then
      die "no ${PRISM_REPO_ROOT}/.venv/bin/tensorboard and no tensorboard on PATH: install the" \
        "requirements (python3 -m venv .venv && .venv/bin/pip install -r requirements.txt)"
    fi
  fi
  run_cmd "$tensorboard" --logdir "${opt_workdir%/}/tensorboard" --port "$PORT"
}

cmd_tunnel() {
  local host_re='^([A-Za-z0-9._-]+@)?[A-Za-z0-9._:-]+$' tensorboard_line
  require_flags tunnel host
  [[ $opt_host =~ $host_re ]] || usage_error "--host must be HOST or USER@HOST, got '${opt_host}'"
  REMOTE_REPO_DIR=${opt_remote_dir:-prism_jax}
  tensorboard_line=$(remote_tensorboard_command "$opt_workdir" "$PORT")
  if [[ $DRY_RUN == 0 ]] && ! command -v ssh >/dev/null 2>&1; then
    die "ssh is not installed or not on PATH"
  fi
  # -t: Ctrl-C here also stops the remote TensorBoard, so its port is free for the next tunnel.
  run_cmd ssh -t -L "${PORT}:localhost:${PORT}" "$opt_host" "$tensorboard_line"
}

main() {
  start_subcommand "local:workdir port dry-run" "tunnel:workdir port host remote-dir dry-run" -- "$@"
  local subcommand=$SUBCOMMAND
  require_flags "$subcommand" workdir
  PORT=${opt_port:-6006}
  check_int_range port "$PORT" 1 65535
  "cmd_${subcommand}"
}

main "$@"
