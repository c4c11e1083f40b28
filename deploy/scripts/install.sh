#!/usr/bin/env bash
# Install hmoe as systemd services: deploy/scripts/install.sh [SOURCE]   (run as root)
# SOURCE is what pip installs into /opt/hmoe/venv (default: this checkout). Idempotent: run it
# again to upgrade the code; /etc/hmoe/hmoe.toml and hmoe.env are written only when missing.
# HMOE_ROOT=DIR stages every file under DIR and touches neither users nor systemd (packaging, tests).
set -euo pipefail
here="$(cd "$(dirname "$0")/../.." && pwd)"
source="${1:-$here}"
root="${HMOE_ROOT:-}"
venv="$root/opt/hmoe/venv"
etc="$root/etc/hmoe"

if [ -z "$root" ] && ! getent passwd hmoe >/dev/null; then
  # A system user: logind's RemoveIPC= never deletes its shared memory (the weight pack).
  useradd --system --user-group --home-dir /var/lib/hmoe --no-create-home --shell /usr/sbin/nologin hmoe
fi

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
constraints=()
if ! "$venv/bin/python" -c 'import torch' 2>/dev/null && ! command -v nvidia-smi >/dev/null; then
  constraints=(-c "$here/deploy/constraints-cpu.txt")
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check "${constraints[@]}" "$source"

install -d -m 0750 "$etc" "$root/etc/systemd/system" "$root/usr/local/bin"
if [ ! -e "$etc/hmoe.toml" ]; then
  "$venv/bin/hmoe" config-skeleton >"$etc/hmoe.toml.new"
  mv "$etc/hmoe.toml.new" "$etc/hmoe.toml"
fi
if [ ! -e "$etc/hmoe.env" ]; then
  cat >"$etc/hmoe.env" <<'ENV'
# Environment of every hmoe unit; HMOE_<SECTION>_<OPTION> overrides that option of hmoe.toml.
# hmoe-pack.service loads HMOE_ROUTER_MODEL_DIR into the pack named HMOE_WORKER_PACK and the
# workers attach that name, so set these two here rather than in hmoe.toml.
HMOE_ROUTER_MODEL_DIR=
HMOE_WORKER_PACK=
# More `hmoe shm load` flags, e.g. --experts int4
HMOE_PACK_ARGS=
ENV
fi
chmod 0640 "$etc/hmoe.toml" "$etc/hmoe.env"
install -m 0644 "$here"/deploy/systemd/hmoe* "$root/etc/systemd/system/"
install -m 0755 "$here/deploy/scripts/hmoectl" "$root/usr/local/bin/hmoectl"

if [ -z "$root" ]; then
  chgrp -R hmoe "$etc"
  systemctl daemon-reload
  systemctl enable hmoe.target
  echo "installed. Set the model in $etc/hmoe.env, then: systemctl start hmoe.target && hmoectl health"
  echo "the OpenAI-compatible API (hmoe-http.service) listens on [http] host:port of $etc/hmoe.toml (127.0.0.1:8000)"
fi
