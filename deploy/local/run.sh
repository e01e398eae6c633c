#!/usr/bin/env bash
# `make run`: the driver in all-in-one mode on an embedded pool (a sparse image file formatted
# XFS with reflink, loop-mounted under $STATE), then `stowagectl demo` against it. Everything it
# starts or mounts is stopped and unmounted on exit, even when the demo fails.
set -euo pipefail
STATE=${STATE:-$PWD/.run}
PY=${PY:-.venv/bin/python}
POOL_SIZE=${POOL_SIZE:-16Gi}
SOCK="$STATE/csi.sock"
mkdir -p "$STATE"
pid=""
cleanup() {
  status=$?
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"; wait "$pid" || true
  fi
  "$PY" -m driver.ctl.main pool destroy --image "$STATE/pool.img" --mount "$STATE/pool" >/dev/null || true
  exit $status
}
trap cleanup EXIT INT TERM

"$PY" -m driver.ctl.main pool create --image "$STATE/pool.img" --mount "$STATE/pool" --size "$POOL_SIZE" --fs xfs
"$PY" -m driver --mode all --endpoint "unix://$SOCK" --pool-dir "$STATE/pool" \
  --node-id "$(hostname)" --metrics-address 127.0.0.1:9810 --log-level warning &
pid=$!
"$PY" -m driver.ctl.main --endpoint "unix://$SOCK" wait
"$PY" -m driver.ctl.main --endpoint "unix://$SOCK" demo --workdir "$STATE/work"
echo "demo finished; driver log level was 'warning' (set it with --log-level in deploy/local/run.sh)"
