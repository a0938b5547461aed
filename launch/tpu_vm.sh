#!/usr/bin/env bash
# Cloud TPU VM life cycle for effjax: create, install, run on all workers, copy back, kill, delete.
# See launch/README.md. Every gcloud call goes through `gc`, so --dry-run shows what would run.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_vm.sh [options] COMMAND [ARGS...]

commands:
  create              create the TPU VM (through a queued resource with --queued) and wait for it
  install             copy this checkout to every worker; install jax[tpu] and effjax in a venv there
  run CMD...          run CMD on every worker at once, in the checkout, with the venv active
                      (--detach: in the background, output to ~/effjax-run.log on each worker)
  logs [N]            last N lines (default 50) of ~/effjax-run.log on every worker
  copy REMOTE [DIR]   copy REMOTE (relative to the checkout on the workers) back to DIR/worker-K
                      (DIR defaults to ./tpu-results)
  kill                kill whatever holds the TPU on every worker and remove the libtpu lock
  status              describe the VM (or the queued resource)
  delete              delete the VM (and its queued resource)

options (environment variable, default):
  --name NAME         TPU_NAME, effjax-tpu
  --project PROJECT   TPU_PROJECT, gcloud's configured project
  --zone ZONE         TPU_ZONE, us-central1-a
  --accelerator TYPE  TPU_ACCELERATOR, v5litepod-8
  --version VERSION   TPU_VERSION, v2-alpha-tpuv5-lite (the TPU software version)
  --spot              TPU_SPOT=1: spot capacity (cheaper, may be preempted)
  --queued            TPU_QUEUED=1: request through a queued resource (waits for capacity)
  --python PYTHON     TPU_PYTHON, python3.11 (installed with apt on the workers if missing)
  --extras EXTRAS     EFFJAX_EXTRAS, tfds (effjax extras to install)
  --dry-run           DRY_RUN=1: print the gcloud commands instead of running them
  -h, --help          this text
EOF
}

NAME="${TPU_NAME:-effjax-tpu}"
PROJECT="${TPU_PROJECT:-}"
ZONE="${TPU_ZONE:-us-central1-a}"
ACCELERATOR="${TPU_ACCELERATOR:-v5litepod-8}"
VERSION="${TPU_VERSION:-v2-alpha-tpuv5-lite}"
SPOT="${TPU_SPOT:-0}"
QUEUED="${TPU_QUEUED:-0}"
PYTHON="${TPU_PYTHON:-python3.11}"
EXTRAS="${EFFJAX_EXTRAS-tfds}"  # empty: no extras
DRY_RUN="${DRY_RUN:-0}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# On the workers, relative to the ssh user's home directory.
REMOTE_DIR="effjax"
REMOTE_VENV="effjax-venv"
REMOTE_LOG="effjax-run.log"

die() { echo "tpu_vm.sh: $*" >&2; exit 2; }

# The value after an option (exits through die when there is none).
value() { [[ $# -ge 2 ]] || die "$1 needs a value"; printf '%s' "$2"; }

# Runs gcloud with the project flag when one was given; prints it instead under --dry-run.
gc() {
  local cmd=(gcloud "$@")
  if [[ -n "$PROJECT" ]]; then cmd+=(--project="$PROJECT"); fi
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "${cmd[@]}"
    echo
  else
    "${cmd[@]}"
  fi
}

on_all_workers() { gc compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command="$1"; }

worker_count() {
  if [[ "$DRY_RUN" == 1 ]]; then echo 1; return; fi
  local ips
  ips="$(gc compute tpus tpu-vm describe "$NAME" --zone="$ZONE" \
    --format='value(networkEndpoints[].ipAddress)')"
  [[ -n "$ips" ]] || die "no workers found for $NAME in $ZONE"
  tr ';' '\n' <<<"$ips" | grep -c .
}

cmd_create() {
  local capacity=()
  if [[ "$SPOT" == 1 ]]; then capacity=(--spot); fi
  if [[ "$QUEUED" == 1 ]]; then
    gc compute tpus queued-resources create "$NAME" --node-id="$NAME" --zone="$ZONE" \
      --accelerator-type="$ACCELERATOR" --runtime-version="$VERSION" "${capacity[@]}"
    if [[ "$DRY_RUN" == 1 ]]; then return; fi
    local state=""
    while [[ "$state" != ACTIVE ]]; do
      state="$(gc compute tpus queued-resources describe "$NAME" --zone="$ZONE" \
        --format='value(state.state)')"
      case "$state" in
        FAILED | SUSPENDED) die "queued resource $NAME is $state" ;;
        ACTIVE) ;;
        *) echo "queued resource $NAME: $state; checking again in 60 s"; sleep 60 ;;
      esac
    done
  else
    gc compute tpus tpu-vm create "$NAME" --zone="$ZONE" --accelerator-type="$ACCELERATOR" \
      --version="$VERSION" "${capacity[@]}"
  fi
}

cmd_install() {
  local archive package="./$REMOTE_DIR"
  if [[ -n "$EXTRAS" ]]; then package+="[$EXTRAS]"; fi
  archive="$(mktemp -t effjax-XXXXXX.tar.gz)"
  # The working tree as git sees it (tracked and untracked, not ignored): no venvs, no caches.
  (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
    | tar --null --ignore-failed-read -czf "$archive" -T -)
  gc compute tpus tpu-vm scp "$archive" "$NAME:effjax.tar.gz" --zone="$ZONE" --worker=all
  rm -f "$archive"
  on_all_workers "set -euo pipefail
    if ! command -v $PYTHON >/dev/null; then
      sudo apt-get update -q && sudo apt-get install -yq $PYTHON $PYTHON-venv
    fi
    rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf effjax.tar.gz -C $REMOTE_DIR
    [[ -d $REMOTE_VENV ]] || $PYTHON -m venv $REMOTE_VENV
    $REMOTE_VENV/bin/pip install -q --upgrade pip
    $REMOTE_VENV/bin/pip install -q 'jax[tpu]' gcsfs -e '$package'
    $REMOTE_VENV/bin/python -c 'import jax; print(jax.process_index(), jax.local_devices())'"
}

cmd_run() {
  local detach=0
  if [[ "${1:-}" == --detach ]]; then detach=1; shift; fi
  [[ $# -gt 0 ]] || die "run needs a command"
  local command="$*"
  local prefix="cd $REMOTE_DIR && source ../$REMOTE_VENV/bin/activate"
  if [[ "$detach" == 1 ]]; then
    on_all_workers "$prefix && nohup bash -c $(printf '%q' "$command") < /dev/null > ../$REMOTE_LOG 2>&1 &"
  else
    on_all_workers "$prefix && $command"
  fi
}

cmd_logs() { on_all_workers "tail -n ${1:-50} $REMOTE_LOG"; }

cmd_copy() {
  [[ $# -ge 1 ]] || die "copy needs a path on the workers"
  local remote="$1" dest="${2:-tpu-results}" workers k
  workers="$(worker_count)"
  for ((k = 0; k < workers; k++)); do
    mkdir -p "$dest/worker-$k"
    gc compute tpus tpu-vm scp --recurse "$NAME:$REMOTE_DIR/$remote" "$dest/worker-$k/" \
      --zone="$ZONE" --worker="$k"
  done
}

cmd_kill() {
  # Only processes holding a TPU device file (v4: /dev/accel*, v5e and later: /dev/vfio/*).
  # shellcheck disable=SC2016  # expanded by the shell on each worker
  on_all_workers 'shopt -s nullglob
    devices=(/dev/accel* /dev/vfio/[0-9]*)
    if [[ ${#devices[@]} -gt 0 ]]; then
      pids="$(sudo lsof -t "${devices[@]}" 2>/dev/null | sort -u || true)"
      if [[ -n "$pids" ]]; then echo "killing $pids"; echo "$pids" | xargs sudo kill -9; fi
    fi
    sudo rm -f /tmp/libtpu_lockfile'
}

cmd_status() {
  if [[ "$QUEUED" == 1 ]]; then
    gc compute tpus queued-resources describe "$NAME" --zone="$ZONE"
  else
    gc compute tpus tpu-vm describe "$NAME" --zone="$ZONE"
  fi
}

cmd_delete() {
  if [[ "$QUEUED" == 1 ]]; then
    gc compute tpus queued-resources delete "$NAME" --zone="$ZONE" --force --quiet
  else
    gc compute tpus tpu-vm delete "$NAME" --zone="$ZONE" --quiet
  fi
}

main() {
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --name) NAME="$(value "$@")"; shift 2 ;;
      --project) PROJECT="$(value "$@")"; shift 2 ;;
      --zone) ZONE="$(value "$@")"; shift 2 ;;
      --accelerator) ACCELERATOR="$(value "$@")"; shift 2 ;;
      --version) VERSION="$(value "$@")"; shift 2 ;;
      --spot) SPOT=1; shift ;;
      --queued) QUEUED=1; shift ;;
      --python) PYTHON="$(value "$@")"; shift 2 ;;
      --extras) EXTRAS="$(value "$@")"; shift 2 ;;
      --dry-run) DRY_RUN=1; shift ;;
      -h | --help) usage; exit 0 ;;
      -*) usage >&2; die "unknown option $1" ;;
      *) break ;;
    esac
  done
  [[ $# -gt 0 ]] || { usage >&2; exit 2; }
  local command="$1"
  shift
  case "$command" in
    create | install | run | logs | copy | kill | status | delete) "cmd_$command" "$@" ;;
    *) usage >&2; die "unknown command $command" ;;
  esac
}

main "$@"
