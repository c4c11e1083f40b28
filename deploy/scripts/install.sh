#!/usr/bin/env bash
# Install hmoe as systemd services (run as root):
#   deploy/scripts/install.sh [--dry-run] [--root DIR] [SOURCE]
# SOURCE is what pip installs into /opt/hmoe/venv (default: this checkout). Idempotent: run it
# again to upgrade the code; /etc/hmoe/hmoe.toml and hmoe.env are written only when missing.
#   --dry-run   print every step it would take, change nothing
#   --root DIR  stage every file under DIR and touch neither users nor systemd (packaging, tests);
#               the HMOE_ROOT environment variable does the same
set -euo pipefail
usage() { sed -n '2,9s/^# \{0,1\}//p' "$0"; }
here="$(cd "$(dirname "$0")/../.." && pwd)"
root="${HMOE_ROOT:-}"
dry_run=0
source=""
while [ "$#" -gt 0 ]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    -n | --dry-run) dry_run=1 ;;
    --root) [ "$#" -ge 2 ] || { echo "install.sh: --root needs a folder" >&2; exit 64; }; root="$2"; shift ;;
    --root=*) root="${1#--root=}" ;;
    -*) echo "install.sh: unknown option '$1' (see --help)" >&2; exit 64 ;;
    *) [ -z "$source" ] || { echo "install.sh: one SOURCE only (see --help)" >&2; exit 64; }; source="$1" ;;
  esac
  shift
done
source="${source:-$here}"
venv="$root/opt/hmoe/venv"
etc="$root/etc/hmoe"

# Each step that changes the machine goes through `run`: --dry-run prints it instead.
run() {
  if [ "$dry_run" -eq 1 ]; then echo "+ $*"; else "$@"; fi
}
# write FILE: standard input into FILE, through FILE.new (never half-written).
write() {
  if [ "$dry_run" -eq 1 ]; then echo "+ write $1"; cat >/dev/null; else cat >"$1.new" && mv "$1.new" "$1"; fi
}

if [ -z "$root" ] && ! getent passwd hmoe >/dev/null; then
  # A system user: logind's RemoveIPC= never deletes its shared memory (the weight pack).
  run useradd --system --user-group --home-dir /var/lib/hmoe --no-create-home --shell /usr/sbin/nologin hmoe
fi

[ -x "$venv/bin/python" ] || run python3 -m venv "$venv"
constraints=()
if ! "$venv/bin/python" -c 'import torch' 2>/dev/null && ! command -v nvidia-smi >/dev/null; then
  constraints=(-c "$here/deploy/constraints-cpu.txt")
fi
run "$venv/bin/python" -m pip install -q --disable-pip-version-check "${constraints[@]}" "$source"

run install -d -m 0750 "$etc" "$root/etc/systemd/system" "$root/usr/local/bin"
if [ ! -e "$etc/hmoe.toml" ]; then
  if [ "$dry_run" -eq 1 ]; then echo "+ write $etc/hmoe.toml (hmoe config-skeleton)"; else
    "$venv/bin/hmoe" config-skeleton | write "$etc/hmoe.toml"
  fi
fi
if [ ! -e "$etc/hmoe.env" ]; then
  write "$etc/hmoe.env" <<'ENV'
# Environment of every hmoe unit; HMOE_<SECTION>_<OPTION> overrides that option of hmoe.toml.
# hmoe-pack.service loads HMOE_ROUTER_MODEL_DIR into the pack named HMOE_WORKER_PACK and the
# workers attach that name, so set these two here rather than in hmoe.toml.
HMOE_ROUTER_MODEL_DIR=
HMOE_WORKER_PACK=
# More `hmoe shm load` flags, e.g. --experts int4
HMOE_PACK_ARGS=
ENV
fi
run chmod 0640 "$etc/hmoe.toml" "$etc/hmoe.env"
run install -m 0644 "$here"/deploy/systemd/hmoe* "$root/etc/systemd/system/"
run install -m 0755 "$here/deploy/scripts/hmoectl" "$root/usr/local/bin/hmoectl"

if [ -z "$root" ]; then
  run chgrp -R hmoe "$etc"
  run systemctl daemon-reload
  run systemctl enable hmoe.target
  if [ "$dry_run" -eq 0 ]; then
    echo "installed. Set the model in $etc/hmoe.env, then: systemctl start hmoe.target && hmoectl health"
    echo "the OpenAI-compatible API (hmoe-http.service) listens on [http] host:port of $etc/hmoe.toml (127.0.0.1:8000)"
  fi
fi
