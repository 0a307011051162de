#!/usr/bin/env bash
# Train and evaluate ddpm_jax on a Cloud TPU VM (a v3-8 by default, or a v4/v5e host or pod slice).
#
#   launch/tpu_vm.sh --bucket gs://my-bucket create      # the VM (add --spot for a spot VM)
#   launch/tpu_vm.sh --bucket gs://my-bucket install     # Python 3.11 venv, jax[tpu], this checkout
#   launch/tpu_vm.sh --bucket gs://my-bucket train       # detached, on every host of the slice
#   launch/tpu_vm.sh --bucket gs://my-bucket logs        # follow worker 0's train.log
#   launch/tpu_vm.sh --bucket gs://my-bucket eval        # FID/IS of the latest checkpoint
#   launch/tpu_vm.sh --bucket gs://my-bucket delete
#
# Add --dry-run to any command to print what it would run (gcloud need not be installed).
# Arguments after `--` go to `python -m ddpm_jax.main`, e.g. `train -- --config.training.num_steps=1000`.
# See launch/README.md for the options, costs and timings.

set -euo pipefail

# Paths on the VM; the remote shell expands their `~`.
# shellcheck disable=SC2088
readonly REMOTE_DIR='~/ddpm_jax' REMOTE_VENV='~/ddpm_venv'
readonly REMOTE_TARBALL='ddpm_jax_src.tar.gz'  # relative to the remote home

TPU_NAME="${TPU_NAME:-ddpm}"
ZONE="${ZONE:-}"                          # empty: a zone that offers the accelerator
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v3-8}"
RUNTIME_VERSION="${RUNTIME_VERSION:-}"    # empty: chosen from the accelerator generation
PROJECT="${PROJECT:-}"
CONFIG="${CONFIG:-configs/cifar10.py}"
BUCKET="${BUCKET:-}"
WORKDIR="${WORKDIR:-}"                    # empty: $BUCKET/runs/<config name>
REPO_URL="${REPO_URL:-}"                  # empty: copy this checkout to the VM with scp
REPO_REF="${REPO_REF:-}"                  # branch or tag of REPO_URL; empty: its default
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
JAX_SPEC="${JAX_SPEC:-jax[tpu]}"          # e.g. 'jax[tpu]==0.7.2' to pin
WORKER="${WORKER:-}"                      # for logs/ssh; default worker 0
CHECKPOINT="${CHECKPOINT:-}"
PROVISIONING=""                           # --spot or --preemptible
DRY_RUN=0
MAIN_ARGS=()
TARBALL=

usage() {
  cat <<'EOF'
usage: launch/tpu_vm.sh [options] COMMAND [-- args for python -m ddpm_jax.main]

commands:
  create    create the TPU VM
  install   copy the project (or clone REPO_URL) to every host; install it with jax[tpu]
  train     start training detached on every host (log: ~/train.log); resumes from the workdir
  logs [train|eval|sample]   follow a log on one worker (default: train, worker 0)
  eval      evaluate a checkpoint detached on every host (log: ~/eval.log)
  sample    write samples of a checkpoint detached on every host (log: ~/sample.log)
  stop      SIGTERM the training run: it saves a checkpoint and exits
  status    describe the VM and show whether ddpm_jax runs on each host
  ssh       an interactive shell on one worker
  delete    delete the VM
  package   only build the source tarball that `install` copies (--output FILE)

options (environment variable in brackets):
  --name NAME           TPU VM name [TPU_NAME, default ddpm]
  --zone ZONE           [ZONE, default by generation: europe-west4-a for v2/v3,
                        us-central2-b for v4, us-west4-a for v5e]
  --accelerator TYPE    v3-8 (default), v4-8, v5e-8, or a pod slice such as v3-32, v4-32,
                        v5e-16 [ACCELERATOR_TYPE]; v5e-N is passed to gcloud as v5litepod-N
  --version RUNTIME     TPU software version [RUNTIME_VERSION, default by generation:
                        tpu-ubuntu2204-base for v2-v4, v2-alpha-tpuv5-lite for v5e]
  --project PROJECT     Google Cloud project [PROJECT, default gcloud's]
  --spot | --preemptible   create a spot / preemptible VM (cheaper; may be stopped at any time)
  --bucket gs://BUCKET  bucket for the workdir [BUCKET]
  --workdir PATH        workdir [WORKDIR, default BUCKET/runs/<config name>]
  --config FILE         config, relative to the repository [CONFIG, default configs/cifar10.py]
  --checkpoint STEP     checkpoint for eval/sample [CHECKPOINT, default the latest]
  --repo-url URL        clone URL instead of copying this checkout [REPO_URL]; --repo-ref REF
  --worker N            worker for logs/ssh [WORKER, default 0]
  --output FILE         tarball path for `package`
  --dry-run             print the commands instead of running them
EOF
}

die() {
  echo "error: $*" >&2
  exit 2
}

# Quote one word for a POSIX shell only when it needs it, so dry-run output stays readable.
quote() {
  local word="$1"
  if [[ -n "$word" && "$word" =~ ^[A-Za-z0-9_./:=@%+,~-]+$ && "$word" != \~* ]]; then
    printf '%s' "$word"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

quote_all() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(quote "$word")"
  done
  printf '%s' "$out"
}

# Run a command, or print it under --dry-run.
run() {
  if ((DRY_RUN)); then
    quote_all "$@"
    echo
  else
    "$@"
  fi
}

# The accelerator type gcloud expects: `v5e-N` is called `v5litepod-N` there.
gcloud_accelerator_type() {
  case "$1" in
    v5e-*) echo "v5litepod-${1#v5e-}" ;;
    *) echo "$1" ;;
  esac
}

# A zone offering the generation (check: gcloud compute tpus accelerator-types list --zone Z).
default_zone() {
  case "$1" in
    v2-* | v3-*) echo "europe-west4-a" ;;
    v4-*) echo "us-central2-b" ;;
    v5e-* | v5litepod-*) echo "us-west4-a" ;;
    v5p-*) echo "us-east5-a" ;;
    v6e-*) echo "us-east1-d" ;;
    *) die "no default zone for --accelerator $1; pass --zone" ;;
  esac
}

default_runtime_version() {
  case "$1" in
    v2-* | v3-* | v4-*) echo "tpu-ubuntu2204-base" ;;
    v5e-* | v5litepod-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) die "no default TPU software version for --accelerator $1; pass --version" ;;
  esac
}

tpu_vm() {
  local args=(gcloud compute tpus tpu-vm "$@" --zone "$ZONE")
  if [[ -n "$PROJECT" ]]; then
    args+=(--project "$PROJECT")
  fi
  run "${args[@]}"
}

# Run a shell command on the given worker(s) of the VM.
on_workers() {
  local workers="$1" command="$2"
  tpu_vm ssh "$TPU_NAME" --worker="$workers" --command "$command"
}

config_name() {
  local base
  base="$(basename "$CONFIG")"
  echo "${base%.py}"
}

resolve_workdir() {
  if [[ -z "$WORKDIR" ]]; then
    [[ -n "$BUCKET" ]] || die "pass --bucket gs://BUCKET (or --workdir) so checkpoints outlive the VM"
    WORKDIR="${BUCKET%/}/runs/$(config_name)"
  fi
}

# The ddpm_jax.main command line for MODE, as one shell-quoted string.
main_command() {
  local mode="$1"
  local args=("$REMOTE_VENV/bin/python" -m ddpm_jax.main --mode="$mode" --config "$CONFIG"
    --workdir "$WORKDIR")
  if [[ "$mode" != train && -n "$CHECKPOINT" ]]; then
    args+=(--checkpoint "$CHECKPOINT")
  fi
  # `${a[@]+...}`: bash < 4.4 (macOS) treats an empty array as unset under `set -u`.
  args+=(${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"})
  # The venv path must stay unquoted so that the remote shell expands `~`.
  printf '%s %s' "${args[0]}" "$(quote_all "${args[@]:1}")"
}

# Start MODE on every host, detached from the ssh session; its output goes to ~/MODE.log.
start_detached() {
  local mode="$1"
  resolve_workdir
  local command
  # `cd || exit` rather than `cd && nohup ... &`: the latter would background a subshell,
  # and `$!` (kept for `stop`) would not be the Python process.
  command="if test -f ~/$mode.pid && kill -0 \"\$(cat ~/$mode.pid)\" 2> /dev/null; then"
  command+=" echo \"$mode is already running on \$(hostname)\" >&2; exit 1; fi;"
  command+=" cd $REMOTE_DIR || exit 1; nohup $(main_command "$mode") > ~/$mode.log 2>&1 < /dev/null &"
  command+=" echo \$! > ~/$mode.pid"
  on_workers all "$command"
  ((DRY_RUN)) || echo "started $mode on $TPU_NAME (workdir $WORKDIR); follow it with: $0 --name $TPU_NAME --zone $ZONE logs $mode" >&2
}

# Write a tarball of this checkout (tracked and untracked files, minus .gitignore'd ones).
package_source() {
  local output="$1" root
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  if ((DRY_RUN)); then
    echo "# package $root -> $output"
    return
  fi
  if git -C "$root" rev-parse --is-inside-work-tree > /dev/null 2>&1; then
    (cd "$root" && source_files | tar --null --files-from=- -czf "$output")
  else
    tar -C "$root" --exclude=.git --exclude=runs --exclude=__pycache__ -czf "$output" .
  fi
}

# NUL-separated files of the git checkout in the current directory, skipping deleted ones.
source_files() {
  local file
  while IFS= read -r -d '' file; do
    if [[ -e "$file" ]]; then
      printf '%s\0' "$file"
    fi
  done < <(git ls-files -z --cached --others --exclude-standard)
}

cmd_create() {
  local version="$RUNTIME_VERSION"
  if [[ -z "$version" ]]; then
    version="$(default_runtime_version "$ACCELERATOR_TYPE")"
  fi
  local args=(create "$TPU_NAME" --accelerator-type "$(gcloud_accelerator_type "$ACCELERATOR_TYPE")"
    --version "$version")
  if [[ -n "$PROVISIONING" ]]; then
    args+=("$PROVISIONING")
  fi
  tpu_vm "${args[@]}"
}

cmd_install() {
  local fetch
  if [[ -n "$REPO_URL" ]]; then
    local clone=(git clone --depth 1)
    if [[ -n "$REPO_REF" ]]; then
      clone+=(--branch "$REPO_REF")
    fi
    fetch="rm -rf $REMOTE_DIR && $(quote_all "${clone[@]}" "$REPO_URL") $REMOTE_DIR"
  else
    if ((DRY_RUN)); then
      TARBALL="${TMPDIR:-/tmp}/ddpm_jax_src.tar.gz"
    else
      TARBALL="$(mktemp -t ddpm_jax_src.XXXXXX)"
      trap 'rm -f "$TARBALL"' EXIT
    fi
    package_source "$TARBALL"
    tpu_vm scp "$TARBALL" "$TPU_NAME:$REMOTE_TARBALL" --worker=all
    fetch="rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf ~/$REMOTE_TARBALL -C $REMOTE_DIR"
  fi
  # The TPU images ship Python 3.10; uv (from PyPI) provides the 3.11 the project needs.
  local install="python3 -m pip install --user --quiet --upgrade uv"
  install+=" && python3 -m uv venv --quiet --python $(quote "$PYTHON_VERSION") $REMOTE_VENV"
  install+=" && python3 -m uv pip install --quiet --python $REMOTE_VENV/bin/python"
  install+=" $(quote "$JAX_SPEC") -e $REMOTE_DIR"
  install+=" && $REMOTE_VENV/bin/python -c 'import jax; print(jax.process_index(), jax.devices())'"
  on_workers all "$fetch && $install"
}

cmd_logs() {
  local log="${1:-train}"
  case "$log" in
    train | eval | sample) ;;
    *) die "logs $log: use one of train, eval, sample" ;;
  esac
  on_workers "${WORKER:-0}" "tail -n 200 -F ~/$log.log"
}

cmd_stop() {
  # shellcheck disable=SC2016  # expanded on the VM
  on_workers all 'test -f ~/train.pid && kill -TERM "$(cat ~/train.pid)" || echo "no training run"'
}

cmd_status() {
  tpu_vm describe "$TPU_NAME"
  on_workers all 'hostname; pgrep -af ddpm_jax.main || echo "ddpm_jax is not running"'
}

cmd_ssh() {
  tpu_vm ssh "$TPU_NAME" --worker="${WORKER:-0}"
}

cmd_delete() {
  tpu_vm delete "$TPU_NAME" --quiet
}

main() {
  local command="" command_args=() output=""
  while (($#)); do
    case "$1" in
      --name) TPU_NAME="${2:?--name needs a value}"; shift 2 ;;
      --zone) ZONE="${2:?--zone needs a value}"; shift 2 ;;
      --accelerator | --accelerator-type) ACCELERATOR_TYPE="${2:?--accelerator needs a value}"; shift 2 ;;
      --version) RUNTIME_VERSION="${2:?--version needs a value}"; shift 2 ;;
      --project) PROJECT="${2:?--project needs a value}"; shift 2 ;;
      --bucket) BUCKET="${2:?--bucket needs a value}"; shift 2 ;;
      --workdir) WORKDIR="${2:?--workdir needs a value}"; shift 2 ;;
      --config) CONFIG="${2:?--config needs a value}"; shift 2 ;;
      --checkpoint) CHECKPOINT="${2:?--checkpoint needs a value}"; shift 2 ;;
      --repo-url) REPO_URL="${2:?--repo-url needs a value}"; shift 2 ;;
      --repo-ref) REPO_REF="${2:?--repo-ref needs a value}"; shift 2 ;;
      --worker) WORKER="${2:?--worker needs a value}"; shift 2 ;;
      --output) output="${2:?--output needs a value}"; shift 2 ;;
      --spot) PROVISIONING="--spot"; shift ;;
      --preemptible) PROVISIONING="--preemptible"; shift ;;
      --dry-run) DRY_RUN=1; shift ;;
      -h | --help) usage; exit 0 ;;
      --) shift; MAIN_ARGS=("$@"); break ;;
      -*) die "unknown option $1 (see --help)" ;;
      *)
        if [[ -z "$command" ]]; then command="$1"; else command_args+=("$1"); fi
        shift ;;
    esac
  done
  [[ -n "$command" ]] || { usage >&2; exit 2; }
  if [[ -z "$ZONE" ]]; then
    ZONE="$(default_zone "$ACCELERATOR_TYPE")"
  fi
  if [[ -n "$BUCKET" && "$BUCKET" != gs://* ]]; then
    die "--bucket $BUCKET: give a gs:// URL, e.g. gs://my-bucket"
  fi

  case "$command" in
    create) cmd_create ;;
    install) cmd_install ;;
    train) start_detached train ;;
    eval) start_detached eval ;;
    sample) start_detached sample ;;
    logs) cmd_logs ${command_args[@]+"${command_args[@]}"} ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    ssh) cmd_ssh ;;
    delete) cmd_delete ;;
    package)
      [[ -n "$output" ]] || die "package needs --output FILE.tar.gz"
      package_source "$output" ;;
    *) die "unknown command $command (see --help)" ;;
  esac
}

main "$@"
