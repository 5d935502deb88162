# shellcheck shell=bash
# Shared helpers for launch/tpu_vm.sh, launch/gpu_vm.sh and launch/tensorboard.sh. Sourced, not run.
#
# Written for bash >= 3.2 (the macOS default): no associative arrays or namerefs, and possibly-empty
# arrays are expanded as ${a[@]+"${a[@]}"} because `set -u` rejects "${a[@]}" there before bash 4.4.
#
# Every command goes through run_cmd, which prints it as `+ <command>` (one line, each word quoted
# for the shell only when it needs it, so a line can be pasted into a terminal) and then runs it; with
# --dry-run it prints the line on stdout and runs nothing.

PRISM_REPO_ROOT=$(cd "${LAUNCH_DIR:?set LAUNCH_DIR before sourcing common.sh}/.." && pwd)
# Where the repository lives on the VMs, relative to the login user's home directory.
REMOTE_REPO_DIR=prism_jax
DRY_RUN=0

die() {
  echo "${PROG}: error: $*" >&2
  exit 1
}

warn() {
  echo "${PROG}: warning: $*" >&2
}

# Prints the message and the script's usage (each script defines `usage`) on stderr; exit status 2.
usage_error() {
  echo "${PROG}: $*" >&2
  echo >&2
  usage >&2
  exit 2
}

# One word, quoted for a POSIX shell only when it holds characters the shell would interpret.
shell_quote() {
  local word=$1 safe='^[A-Za-z0-9_./:=,@%+-]+$'
  if [[ $word =~ $safe ]]; then
    printf '%s' "$word"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

# A command line from words; `--flag=value` keeps the flag bare and quotes only the value.
format_command() {
  local line="" word flag_re='^(--[A-Za-z0-9_.-]+=)(.*)$'
  for word in "$@"; do
    if [[ $word =~ $flag_re ]]; then
      word="${BASH_REMATCH[1]}$(shell_quote "${BASH_REMATCH[2]}")"
    else
      word=$(shell_quote "$word")
    fi
    line+="${line:+ }${word}"
  done
  printf '%s' "$line"
}

# Prints `+ <command>`; runs it unless --dry-run (then the line goes to stdout and nothing runs).
run_cmd() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '+ %s\n' "$(format_command "$@")"
  else
    printf '+ %s\n' "$(format_command "$@")" >&2
    "$@"
  fi
}

# ---------------------------------------------------------------------------------------------------
# Flags. FLAG_SPEC lists the flags a script knows: `name=` takes a value, `name+` takes a value and
# may repeat (collected in the array opt_name), a bare `name` is a switch (opt_name=1). Dashes in
# names become underscores in variables. Both `--flag value` and `--flag=value` are accepted.
# Positional words land in POSITIONAL; GIVEN_FLAGS lists the flags that were used.

parse_flags() {
  POSITIONAL=()
  GIVEN_FLAGS=""
  local arg flag value has_value var
  while [[ $# -gt 0 ]]; do
    arg=$1
    shift
    case $arg in
      -h | --help)
        usage
        exit 0
        ;;
      --*=*) flag=${arg%%=*} value=${arg#*=} has_value=1 ;;
      --?*) flag=$arg value="" has_value=0 ;;
      -?*) usage_error "unknown option ${arg}" ;;
      *)
        POSITIONAL+=("$arg")
        continue
        ;;
    esac
    flag=${flag#--}
    var=opt_${flag//-/_}
    if [[ " ${FLAG_SPEC} " == *" ${flag} "* ]]; then
      [[ $has_value == 0 ]] || usage_error "--${flag} takes no value"
      printf -v "$var" '%s' 1
    elif [[ " ${FLAG_SPEC} " == *" ${flag}= "* || " ${FLAG_SPEC} " == *" ${flag}+ "* ]]; then
      if [[ $has_value == 0 ]]; then
        [[ $# -gt 0 ]] || usage_error "--${flag} needs a value"
        value=$1
        shift
      fi
      [[ -n $value ]] || usage_error "--${flag} needs a non-empty value"
      if [[ " ${FLAG_SPEC} " == *" ${flag}+ "* ]]; then
        eval "${var}+=(\"\$value\")"
      else
        printf -v "$var" '%s' "$value"
      fi
    else
      usage_error "unknown flag --${flag}"
    fi
    GIVEN_FLAGS+=" ${flag}"
  done
}

# Rejects flags that the subcommand does not use (a mistyped run would otherwise go unnoticed).
allow_flags() {
  local subcommand=$1 allowed=" $2 " flag
  for flag in ${GIVEN_FLAGS}; do
    [[ $allowed == *" ${flag} "* ]] || usage_error "${subcommand} does not take --${flag}"
  done
}

# start_subcommand "NAME:FLAGS" ... -- "$@": parses the command line, which must hold exactly one
# subcommand word, one of the NAMEs; allows only that subcommand's FLAGS (space-separated); sets
# SUBCOMMAND, and DRY_RUN for --dry-run.
start_subcommand() {
  local specs=() spec names=""
  while [[ $1 != -- ]]; do
    specs+=("$1")
    shift
  done
  shift
  for spec in "${specs[@]}"; do
    names+="${names:+, }${spec%%:*}"
  done
  parse_flags "$@"
  [[ ${#POSITIONAL[@]} -eq 1 ]] ||
    usage_error "expected one subcommand (${names}), got ${#POSITIONAL[@]} words: ${POSITIONAL[*]-}"
  SUBCOMMAND=${POSITIONAL[0]}
  [[ -z $opt_dry_run ]] || DRY_RUN=1
  for spec in "${specs[@]}"; do
    if [[ ${spec%%:*} == "$SUBCOMMAND" ]]; then
      allow_flags "$SUBCOMMAND" "${spec#*:}"
      return
    fi
  done
  usage_error "unknown subcommand '${SUBCOMMAND}'"
}

require_flags() {
  local subcommand=$1 flag var
  shift
  for flag in "$@"; do
    var=opt_${flag//-/_}
    [[ -n ${!var:-} ]] || usage_error "${subcommand} needs --${flag}"
  done
}

check_int_range() {
  local flag=$1 value=$2 low=$3 high=$4
  if [[ ! $value =~ ^[0-9]+$ ]] || ((10#$value < low || 10#$value > high)); then
    usage_error "--${flag} must be an integer in [${low}, ${high}], got '${value}'"
  fi
}

# Compute Engine / Cloud TPU resource names: lowercase letters, digits and dashes.
check_resource_name() {
  local name=$1 max_len=$2 re='^[a-z]([-a-z0-9]*[a-z0-9])?$'
  [[ $name =~ $re && ${#name} -le $max_len ]] ||
    usage_error "--name must start with a lowercase letter, hold only lowercase letters, digits and dashes," \
      "end with a letter or digit and be at most ${max_len} characters, got '${name}'"
}

# --zone, or the CLOUDSDK_COMPUTE_ZONE that gcloud itself reads.
resolve_zone() {
  ZONE=${opt_zone:-${CLOUDSDK_COMPUTE_ZONE:-}}
  [[ -n $ZONE ]] || usage_error "$1 needs --zone (or CLOUDSDK_COMPUTE_ZONE in the environment)"
}

# ---------------------------------------------------------------------------------------------------
# Cloud environment. Called after the arguments are validated and before anything runs; --dry-run
# needs neither gcloud nor a project.

require_gcloud() {
  command -v gcloud >/dev/null 2>&1 ||
    die "gcloud (the Google Cloud CLI) is not installed or not on PATH. Install it" \
      "(https://cloud.google.com/sdk/docs/install), then run 'gcloud auth login' and" \
      "'gcloud config set project PROJECT_ID'. To only print the commands, add --dry-run."
}

# --project, then CLOUDSDK_CORE_PROJECT, then `gcloud config get-value project`. A dry run does not
# call gcloud: without a flag or variable it prints the placeholder PROJECT_ID.
resolve_project() {
  PROJECT=${opt_project:-${CLOUDSDK_CORE_PROJECT:-}}
  if [[ -z $PROJECT && $DRY_RUN == 1 ]]; then
    PROJECT=PROJECT_ID
    warn "no --project or CLOUDSDK_CORE_PROJECT: the commands below show --project=PROJECT_ID" \
      "(a real run uses 'gcloud config get-value project')"
    return
  fi
  if [[ -z $PROJECT ]]; then
    PROJECT=$(gcloud config get-value project 2>/dev/null) || PROJECT=""
  fi
  [[ -n $PROJECT && $PROJECT != "(unset)" ]] ||
    die "no Google Cloud project is set. Pass --project PROJECT_ID, export" \
      "CLOUDSDK_CORE_PROJECT=PROJECT_ID, or run 'gcloud config set project PROJECT_ID'."
}

check_cloud_environment() {
  if [[ $DRY_RUN == 0 ]]; then
    require_gcloud
  fi
  resolve_project
}

# ---------------------------------------------------------------------------------------------------
# What runs on the VMs. Each function prints one shell command line for `--command=`; paths on the
# VMs are relative to the home directory; relative --workdir and sync targets are relative to the
# repository copy there (~/prism_jax).

# The jax version pinned in requirements.txt, so the accelerator extra always matches it.
jax_version() {
  local line
  while IFS= read -r line || [[ -n $line ]]; do
    if [[ $line == jax==* ]]; then
      line=${line#jax==}
      printf '%s' "${line%%[[:space:]#]*}"
      return 0
    fi
  done <"${PRISM_REPO_ROOT}/requirements.txt"
  die "no 'jax==<version>' line in ${PRISM_REPO_ROOT}/requirements.txt"
}

# The source tarball: `git archive` of a commit (default HEAD), with every path under prism_jax/.
tarball_path() {
  printf '%s/prism_jax-%s.tar.gz' "${TMPDIR:-/tmp}" "$1"
}

make_tarball() {
  run_cmd git -C "$PRISM_REPO_ROOT" archive --format=tar.gz "--prefix=${REMOTE_REPO_DIR}/" \
    "--output=$1" "$2"
}

check_python_name() {
  [[ $1 =~ ^[A-Za-z0-9._/-]+$ ]] || usage_error "--python must be an interpreter name or path, got '$1'"
}

# Live runs only: the archive holds committed files, so say when the work tree differs from them.
warn_if_dirty() {
  if ! command -v git >/dev/null 2>&1 || ! git -C "$PRISM_REPO_ROOT" rev-parse --git-dir >/dev/null 2>&1; then
    die "setup copies the code with git archive, but ${PRISM_REPO_ROOT} is not a git repository" \
      "(or git is not installed)"
  fi
  git -C "$PRISM_REPO_ROOT" rev-parse --verify --quiet "$1^{commit}" >/dev/null ||
    die "--ref ${1} is not a commit of ${PRISM_REPO_ROOT}"
  if [[ $1 == HEAD && -n $(git -C "$PRISM_REPO_ROOT" status --porcelain --untracked-files=no) ]]; then
    warn "the work tree has uncommitted changes; only committed files (HEAD) are copied"
  fi
}

# Unpacks the tarball over ~/prism_jax (the package directory is replaced, so deleted modules do not
# linger; .venv, logs and local work directories stay), makes the venv with PYTHON (installed with
# apt when it is missing or lacks venv support) and installs the pinned requirements plus the
# accelerator's jax extra, then runs CHECK with the venv's python.
remote_setup_command() {
  local python=$1 jax_extra=$2 check=$3 q_python version
  # Runs inside $(...), where errexit does not apply: stop explicitly when the pin is missing.
  version=$(jax_version) || exit 1
  q_python=$(shell_quote "$python")
  printf '%s' "rm -rf ${REMOTE_REPO_DIR}/prism_jax && tar -xzf ${REMOTE_REPO_DIR}.tar.gz" \
    " && rm -f ${REMOTE_REPO_DIR}.tar.gz && cd ${REMOTE_REPO_DIR}" \
    " && { ${q_python} -c \"import ensurepip\" 2>/dev/null || { sudo apt-get update -q" \
    " && sudo apt-get install -y -q -o DPkg::Lock::Timeout=300 ${q_python} ${q_python}-venv; }; }" \
    " && ${q_python} -m venv .venv && .venv/bin/pip install -q --upgrade pip" \
    " && .venv/bin/pip install -q -r requirements.txt \"jax[${jax_extra}]==${version}\"" \
    " && .venv/bin/python -c \"${check}\""
}

# Arguments: the --sync-from values, each GS_PATH:LOCAL_DIR. Fills SYNC_SOURCES / SYNC_TARGETS.
parse_sync_specs() {
  SYNC_SOURCES=()
  SYNC_TARGETS=()
  local spec source target
  for spec in "$@"; do
    source=${spec%:*}
    target=${spec##*:}
    [[ $source == gs://?* && -n $target && $target != //* ]] ||
      usage_error "--sync-from must be GS_PATH:LOCAL_DIR (e.g. gs://bucket/teachers:teachers), got '${spec}'"
    SYNC_SOURCES+=("$source")
    SYNC_TARGETS+=("$target")
  done
}

# `gcloud storage rsync -r` of every --sync-from folder; empty when there is none.
remote_sync_command() {
  local i line="cd ${REMOTE_REPO_DIR}" target
  [[ ${#SYNC_SOURCES[@]} -gt 0 ]] || return 0
  for ((i = 0; i < ${#SYNC_SOURCES[@]}; i++)); do
    target=$(shell_quote "${SYNC_TARGETS[i]}")
    line+=" && mkdir -p ${target} && gcloud storage rsync -r $(shell_quote "${SYNC_SOURCES[i]}") ${target}"
  done
  printf '%s' "$line"
}

# Arguments: the --override values, each FIELD=VALUE (`config.FIELD=`, `--config.FIELD=` also work).
# Fills CONFIG_OVERRIDES with --config.FIELD=VALUE.
parse_overrides() {
  CONFIG_OVERRIDES=()
  local item key_re='^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*=' override
  for item in "$@"; do
    override=${item#--}
    override=${override#config.}
    [[ $override =~ $key_re ]] ||
      usage_error "--override must be FIELD=VALUE with a config field such as squeeze.epochs=50, got '${item}'"
    CONFIG_OVERRIDES+=("--config.${override}")
  done
}

# Config files are paths in the repository (the VMs get the same tree); `file.py:arg` is allowed.
check_config_path() {
  local config=$1
  [[ $config == /* || -f "${PRISM_REPO_ROOT}/${config%%:*}" ]] ||
    usage_error "--config ${config%%:*} is not a file of the repository ${PRISM_REPO_ROOT}" \
      "(give it relative to the repository root, e.g. configs/quickstart.py)"
}

# The log file of a run on the VMs: logs/<last part of the work directory>.log, appended to by every
# run (and resume) with that work directory.
log_file_for() {
  local name=${1%/}
  name=${name##*/}
  name=${name//[^A-Za-z0-9._-]/_}
  printf 'logs/%s.log' "${name:-run}"
}

# Starts `python -m prism_jax.main` detached (nohup, output appended to LOG_FILE) and prints its pid.
# Arguments: LOG_FILE, then the arguments of prism_jax.main.
remote_run_command() {
  local log_file=$1
  shift
  # $(hostname) and $! expand on the VM.
  # shellcheck disable=SC2016
  printf '%s' "cd ${REMOTE_REPO_DIR} && mkdir -p logs" \
    " && { nohup env PYTHONUNBUFFERED=1 .venv/bin/python -m prism_jax.main $(format_command "$@")" \
    " >>${log_file} 2>&1 </dev/null &" \
    " echo \"\$(hostname): started pid \$! (log ~/${REMOTE_REPO_DIR}/${log_file})\"; }"
}

# TensorBoard on the VM, in the foreground (the ssh tunnel lives as long as it runs).
remote_tensorboard_command() {
  local workdir=${1%/} port=$2
  printf '%s' "cd $(shell_quote "$REMOTE_REPO_DIR") && .venv/bin/tensorboard --logdir $(shell_quote "${workdir}/tensorboard") --port ${port}"
}
