#!/usr/bin/env bash
# Make the container images the e2e node runs, without a container engine, into
# ~/.cache/stowage/e2e/images (never committed):
#   - the Go-built sidecars that build.sh cached (csi-provisioner, csi-resizer, csi-snapshotter,
#     snapshot-controller) as single-binary images registry.local/sig-storage/<name>:<version>,
#     entrypoint /<name> as in the upstream images;
#   - the stand-ins for the sidecars the module proxy refuses, clearly named as such:
#     registry.local/stowage-e2e/csi-node-driver-registrar-standin:v2.17.0 and
#     registry.local/stowage-e2e/livenessprobe-standin:v2.19.0 (tests/e2e/registrar.py and
#     tests/e2e/livenessprobe.py on the Stowage image's Debian + wheels layers).
# Each image is an OCI archive that `ctr -n k8s.io images import` takes. A sidecar that build.sh
# has not cached yet is skipped with a note (this script never starts the Go build); a warm run
# only rewrites what changed. Prints the images directory on the last line.
#
#   tests/e2e/tools/build-images.sh [--bin DIR] [--out DIR] [--no-standins]
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "${here}/../../.." && pwd)
K8S_VERSION=${K8S_VERSION:-v1.34.4}
cache="${HOME}/.cache/stowage/e2e/k8s-${K8S_VERSION}"
bin="${cache}/bin"
out="${HOME}/.cache/stowage/e2e/images"
standins=1
PY=${PY:-python3}
while [ $# -gt 0 ]; do
  case $1 in
    --bin) bin=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --no-standins) standins=0; shift ;;
    *) echo "usage: $0 [--bin DIR] [--out DIR] [--no-standins]" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
log() { echo "e2e-images: $*" >&2; }

# The versions build.sh built (its versions file), else build.sh's defaults.
version_of() {
  local v=""
  [ -f "${bin}/../versions" ] && v=$(awk -v p="$1" '$1 == p {print $2}' "${bin}/../versions")
  if [ -z "$v" ]; then
    case $1 in
      csi-provisioner) v=${PROVISIONER_VERSION:-v6.3.0} ;;
      csi-resizer) v=${RESIZER_VERSION:-v2.2.0} ;;
      csi-snapshotter|snapshot-controller) v=${SNAPSHOTTER_VERSION:-v8.6.0} ;;
    esac
  fi
  echo "$v"
}

made=0 skipped=""
for prog in csi-provisioner csi-resizer csi-snapshotter snapshot-controller; do
  if [ ! -x "${bin}/${prog}" ]; then
    skipped="${skipped} ${prog}"
    continue
  fi
  ref="registry.local/sig-storage/${prog}:$(version_of "$prog")"
  "$PY" "${repo}/deploy/image/mkimage.py" --ref "$ref" --out "${out}/${prog}.oci.tar" \
    --static "${bin}/${prog}:/${prog}" --entrypoint "/${prog}" >&2
  echo "$ref" >"${out}/${prog}.ref"
  made=$((made + 1))
done
[ -n "$skipped" ] && log "not cached by tests/e2e/tools/build.sh yet, skipped:${skipped}"
if [ "$standins" = 1 ]; then
  "$PY" "${repo}/deploy/image/build.py" standins --out "$out"
  for prog in csi-node-driver-registrar livenessprobe; do
    "$PY" - "${out}/${prog}-standin.oci.tar" >"${out}/${prog}-standin.ref" <<'PY'
import json, sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    index = json.load(t.extractfile("index.json"))
print(index["manifests"][0]["annotations"]["io.containerd.image.name"])
PY
    made=$((made + 1))
  done
fi
log "${made} images in ${out}"
echo "$out"
