#!/usr/bin/env bash
# Create .venv in the repository and install hmoe into it, editable: dev-setup.sh [test]
# A machine without a GPU gets the CPU build of torch (deploy/constraints-cpu.txt) instead of
# several GB of CUDA packages; a venv that already has torch keeps it.
set -euo pipefail
case "${1:-}" in
  -h | --help)
    sed -n '2,4s/^# \{0,1\}//p' "$0"
    exit 0 ;;
  "" | test | bench | test,bench | bench,test) ;;
  *) echo "dev-setup.sh: unknown extra '$1': use test or bench (see --help)" >&2; exit 64 ;;
esac
cd "$(dirname "$0")/../.."
extras="${1:-}"
[ -x .venv/bin/python ] || python3 -m venv .venv
constraints=()
if ! .venv/bin/python -c 'import torch' 2>/dev/null && ! command -v nvidia-smi >/dev/null; then
  constraints=(-c deploy/constraints-cpu.txt)
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "${constraints[@]}" -e ".${extras:+[$extras]}"
# The deploy tests need shellcheck and systemd-analyze: install Debian's packages when missing
# and this is root with apt-get (CI); elsewhere those tests say what to install and skip.
if [[ ",$extras," == *,test,* ]] && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  missing=()
  command -v shellcheck >/dev/null || missing+=(shellcheck)
  command -v systemd-analyze >/dev/null || missing+=(systemd)
  if [ "${#missing[@]}" -gt 0 ]; then
    log=$(apt-get update -qq 2>&1 && DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends "${missing[@]}" 2>&1) || { echo "$log" >&2; exit 1; }
  fi
fi
