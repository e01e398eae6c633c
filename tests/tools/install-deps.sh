#!/usr/bin/env bash
# Install what Stowage needs on a fresh Debian machine (run as root): host tools from apt and the
# Python environment in .venv. Idempotent and quiet when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/../.."

need=()
for tool in mkfs.ext4:e2fsprogs mkfs.xfs:xfsprogs mkfs.btrfs:btrfs-progs losetup:mount \
            blkid:util-linux fsfreeze:util-linux; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool##*:}")
done
if [ "${#need[@]}" -gt 0 ]; then
  echo "installing host packages: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  # Debian's python3 needs python3-venv for `-m venv` (ensurepip).
  if ! "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    echo "installing python3-venv"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
  fi
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "installing the Python environment in .venv (pip install -e '.[dev]'; log: .venv/install.log)"
  # pip's and setuptools' notices (the editable-install banner among them) go to the log; it is
  # shown only when the install fails.
  if ! { .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e '.[dev]'; } \
      >.venv/install.log 2>&1; then
    cat .venv/install.log >&2
    exit 1
  fi
  rm -f .venv/.installed-*
  touch "$stamp"
fi
