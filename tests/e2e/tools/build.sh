#!/usr/bin/env bash
# Build the pinned control plane and CSI sidecars for `make e2e` from the Go module proxy.
#
# Each program is built in a throwaway wrapper module that requires the upstream module at its
# tag and copies its `replace` lines (Kubernetes' staging modules, the sidecars' k8s.io pins), so
# the build resolves exactly what upstream resolves. Results are cached under
# ~/.cache/stowage/e2e/<set>/bin; a warm cache makes this a no-op. Nothing is committed.
# Prints the bin directory on the last line.
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.34.4}
ETCD_VERSION=${ETCD_VERSION:-v3.6.16}
PROVISIONER_VERSION=${PROVISIONER_VERSION:-v6.3.0}
RESIZER_VERSION=${RESIZER_VERSION:-v2.2.0}
SNAPSHOTTER_VERSION=${SNAPSHOTTER_VERSION:-v8.6.0}

set_name="k8s-${K8S_VERSION}"
cache="${HOME}/.cache/stowage/e2e/${set_name}"
bin="${cache}/bin"
mkdir -p "$bin"
export PATH="$PATH:/usr/local/go/bin"
export GOFLAGS=-mod=mod
export CGO_ENABLED=0

log() { echo "e2e-tools: $*" >&2; }

PROGRAMS="etcd kube-apiserver kube-controller-manager kube-scheduler csi-provisioner csi-resizer csi-snapshotter snapshot-controller"
if [ "${1:-}" = "--check" ]; then  # exit 0 when every program is cached
  for p in $PROGRAMS; do [ -x "${bin}/${p}" ] || exit 1; done
  exit 0
fi

# wrapper NAME MODULE VERSION PREFIX-FOR-STAGING -> prints the wrapper directory
wrapper() {
  local name=$1 module=$2 version=$3 staging_version=${4:-}
  local dir="${cache}/src/${name}"
  mkdir -p "$dir"
  local gomod
  gomod=$(cd "$dir" && go mod download -json "${module}@${version}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  python3 - "$gomod" "$module" "$version" "$staging_version" "$name" >"${dir}/go.mod" <<'PY'
import re, sys
gomod, module, version, staging_version, name = sys.argv[1:]
text = open(gomod).read()
go_line = re.search(r"^go (\S+)", text, re.M).group(1)
replaces = []
root = re.sub(r"/v[0-9]+$", "", module)  # the repository path of a /vN module
block = re.findall(r"^replace \((.*?)^\)", text, re.M | re.S)
lines = [l for b in block for l in b.splitlines()] + re.findall(r"^replace (.+)$", text, re.M)
for line in lines:
    line = line.split("//")[0].strip()
    if not line or line.startswith("("):
        continue
    m = re.match(r"(\S+)(?:\s+\S+)?\s+=>\s+(\S+)(?:\s+(\S+))?$", line)
    if not m:
        continue
    old, new, ver = m.groups()
    if new.startswith("./staging/"):  # k8s.io/kubernetes: staging modules at the matching v0 tag
        replaces.append(f"{old} => {old} {staging_version}")
    elif new.startswith("./") and old.startswith(f"{root}/{new[2:].rstrip('/')}"):
        # a module of the same repository (snapshotter's client/v8 => ./client) is tagged
        # with the same version
        replaces.append(f"{old} => {old} {version}")
    elif new.startswith(".") or new.startswith("/"):
        continue
    else:
        replaces.append(f"{old} => {new} {ver}")
print(f"module stowage.local/e2e/{name}\n\ngo {go_line}\n\nrequire {module} {version}\n")
for r in replaces:
    print(f"replace {r}")
PY
  echo "$dir"
}

build() {  # build NAME OUT MODULE VERSION PKG [LDFLAGS] [STAGING]
  local name=$1 out=$2 module=$3 version=$4 pkg=$5 ldflags=${6:-} staging=${7:-}
  if [ -x "${bin}/${out}" ]; then
    log "${out} cached"
    return
  fi
  local started dir
  started=$(date +%s)
  dir=$(wrapper "$name" "$module" "$version" "$staging")
  log "building ${out} from ${module}@${version}"
  if [ "$pkg" = "etcd-main" ]; then
    cat >"${dir}/main.go" <<'GO'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
    pkg=.
  fi
  (cd "$dir" && go build -trimpath -ldflags "-s -w ${ldflags}" -o "${bin}/${out}.tmp" "$pkg")
  mv "${bin}/${out}.tmp" "${bin}/${out}"
  log "built ${out} in $(( $(date +%s) - started ))s"
}

total_started=$(date +%s)
k8s_stamp="-X k8s.io/component-base/version.gitVersion=${K8S_VERSION} -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$(echo "$K8S_VERSION" | cut -d. -f2) -X k8s.io/component-base/version.gitTreeState=clean"
staging="v0.${K8S_VERSION#v1.}"
build etcd etcd go.etcd.io/etcd/server/v3 "$ETCD_VERSION" etcd-main "-X go.etcd.io/etcd/api/v3/version.Version=${ETCD_VERSION#v}"
for cmd in kube-apiserver kube-controller-manager kube-scheduler; do
  build kubernetes "$cmd" k8s.io/kubernetes "$K8S_VERSION" "k8s.io/kubernetes/cmd/${cmd}" "$k8s_stamp" "$staging"
done
build provisioner csi-provisioner github.com/kubernetes-csi/external-provisioner/v6 "$PROVISIONER_VERSION" github.com/kubernetes-csi/external-provisioner/v6/cmd/csi-provisioner
build resizer csi-resizer github.com/kubernetes-csi/external-resizer/v2 "$RESIZER_VERSION" github.com/kubernetes-csi/external-resizer/v2/cmd/csi-resizer
build snapshotter csi-snapshotter github.com/kubernetes-csi/external-snapshotter/v8 "$SNAPSHOTTER_VERSION" github.com/kubernetes-csi/external-snapshotter/v8/cmd/csi-snapshotter
build snapshotter snapshot-controller github.com/kubernetes-csi/external-snapshotter/v8 "$SNAPSHOTTER_VERSION" github.com/kubernetes-csi/external-snapshotter/v8/cmd/snapshot-controller
cat >"${cache}/versions" <<V
kubernetes ${K8S_VERSION}
etcd ${ETCD_VERSION}
csi-provisioner ${PROVISIONER_VERSION}
csi-resizer ${RESIZER_VERSION}
csi-snapshotter ${SNAPSHOTTER_VERSION}
snapshot-controller ${SNAPSHOTTER_VERSION}
V
log "tools ready in $(( $(date +%s) - total_started ))s"
echo "$bin"
