#!/usr/bin/env bash
# Create .venv in the repository and install hmoe into it, editable: dev-setup.sh [test]
# A machine without a GPU gets the CPU build of torch (deploy/constraints-cpu.txt) instead of
# several GB of CUDA packages; a venv that already has torch keeps it.
set -euo pipefail
cd "$(dirname "$0")/../.."
extras="${1:-}"
[ -x .venv/bin/python ] || python3 -m venv .venv
constraints=()
if ! .venv/bin/python -c 'import torch' 2>/dev/null && ! command -v nvidia-smi >/dev/null; then
  constraints=(-c deploy/constraints-cpu.txt)
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "${constraints[@]}" -e ".${extras:+[$extras]}"
