#!/usr/bin/env bash
# One GPU machine for effjax: install jax[cuda] and effjax in a venv, check the GPU, run a command.
# Runs here, or on --host USER@HOST over ssh (the checkout is copied there first). See launch/README.md.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/gpu.sh [options] COMMAND [ARGS...]

commands:
  install             create the venv and install jax[CUDA] and effjax (this checkout, editable)
  check               print the JAX devices; fails when no GPU is visible
  run CMD [ARGS...]   run CMD in the checkout with the venv active (shell syntax: run bash -c '...')

options (environment variable, default):
  --host USER@HOST    GPU_HOST, none: work on this machine; else copy the checkout to ~/effjax
                      on HOST (for install) and run the command there over ssh
  --venv DIR          GPU_VENV, .venv-gpu (relative to the checkout)
  --python PYTHON     GPU_PYTHON, python3 (3.11 or newer)
  --cuda EXTRA        GPU_CUDA, cuda12 (jax extra: cuda12 or cuda13, matching the driver)
  --extras EXTRAS     EFFJAX_EXTRAS, tfds (effjax extras to install)
  --mem-fraction F    GPU_MEM_FRACTION, 0.9 (XLA_PYTHON_CLIENT_MEM_FRACTION for run)
  -h, --help          this text
EOF
}

HOST="${GPU_HOST:-}"
VENV="${GPU_VENV:-.venv-gpu}"
PYTHON="${GPU_PYTHON:-python3}"
CUDA="${GPU_CUDA:-cuda12}"
EXTRAS="${EFFJAX_EXTRAS-tfds}"  # empty: no extras
MEM_FRACTION="${GPU_MEM_FRACTION:-0.9}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REMOTE_DIR="effjax"  # on --host, relative to the ssh user's home directory

die() { echo "gpu.sh: $*" >&2; exit 2; }

# The value after an option (exits through die when there is none).
value() { [[ $# -ge 2 ]] || die "$1 needs a value"; printf '%s' "$2"; }

cmd_install() {
  command -v "$PYTHON" >/dev/null || die "$PYTHON not found; pass --python"
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$PYTHON is older than 3.11; pass --python"
  [[ -d "$VENV" ]] || "$PYTHON" -m venv "$VENV"
  local package="."
  if [[ -n "$EXTRAS" ]]; then package+="[$EXTRAS]"; fi
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q "jax[$CUDA]" -e "$package"
  cmd_check
}

cmd_check() {
  "$VENV/bin/python" - <<'EOF'
import jax
devices = jax.devices()
print(jax.__version__, devices)
raise SystemExit(0 if devices[0].platform == "gpu" else "no GPU visible to JAX")
EOF
}

cmd_run() {
  [[ $# -gt 0 ]] || die "run needs a command"
  # The venv is made by install, so shellcheck cannot follow it.
  # shellcheck source=/dev/null
  source "$VENV/bin/activate"
  XLA_PYTHON_CLIENT_MEM_FRACTION="$MEM_FRACTION" "$@"
}

# Copies the working tree as git sees it (tracked and untracked, not ignored) to HOST:~/effjax.
# shellcheck disable=SC2029  # REMOTE_DIR is expanded here on purpose
push_checkout() {
  (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
    | tar --null --ignore-failed-read -czf - -T -) \
    | ssh "$HOST" "mkdir -p $REMOTE_DIR && tar -xzf - -C $REMOTE_DIR"
}

main() {
  local forwarded=()  # options that the copy of this script on HOST needs too
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --host) HOST="$(value "$@")"; shift 2 ;;
      --venv) VENV="$(value "$@")"; forwarded+=("$1" "$2"); shift 2 ;;
      --python) PYTHON="$(value "$@")"; forwarded+=("$1" "$2"); shift 2 ;;
      --cuda) CUDA="$(value "$@")"; forwarded+=("$1" "$2"); shift 2 ;;
      --extras) EXTRAS="$(value "$@")"; forwarded+=("$1" "$2"); shift 2 ;;
      --mem-fraction) MEM_FRACTION="$(value "$@")"; forwarded+=("$1" "$2"); shift 2 ;;
      -h | --help) usage; exit 0 ;;
      -*) usage >&2; die "unknown option $1" ;;
      *) break ;;
    esac
  done
  [[ $# -gt 0 ]] || { usage >&2; exit 2; }
  local command="$1"
  shift
  case "$command" in
    install | check | run) ;;
    *) usage >&2; die "unknown command $command" ;;
  esac
  if [[ -n "$HOST" ]]; then
    if [[ "$command" == install ]]; then push_checkout; fi
    local args=(bash launch/gpu.sh "${forwarded[@]}" "$command" "$@")
    ssh -t "$HOST" "cd $REMOTE_DIR && $(printf '%q ' "${args[@]}")"
    return
  fi
  cd "$ROOT"
  "cmd_$command" "$@"
}

main "$@"
