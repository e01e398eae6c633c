#!/usr/bin/env bash
# Build the pinned node tools for the e2e node (kubelet, kube-proxy, kubectl, containerd,
# node-driver-registrar) from
# the Go module proxy, install the Debian packages a node needs, and make the pause and busybox
# images without a container engine (tests/e2e/tools/mkimage.py).
#
# Same technique and cache as build.sh: kubelet is built in the k8s.io/kubernetes wrapper module
# (reused when build.sh made it), containerd in a wrapper that requires containerd/v2 at its tag.
# Binaries go to ~/.cache/stowage/e2e/<set>/bin, image tarballs to ~/.cache/stowage/e2e/<set>/images.
# A warm cache makes this a no-op. Nothing is committed. Prints the bin directory on the last line.
#
#   tests/e2e/tools/build-node.sh           build what is missing
#   tests/e2e/tools/build-node.sh --check   exit 0 when everything is cached and installed
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.34.4}
CONTAINERD_VERSION=${CONTAINERD_VERSION:-v2.2.9}
# node-driver-registrar's module path lacks /v2, so its v2 tags are no Go versions: it can only
# be required at the pseudo-version of the v2.17.0 tag's commit. Empty = skip it (see the report
# printed at the end); set REGISTRAR_PSEUDO=v0.0.0-<UTC time>-<12 hex> to build it.
REGISTRAR_VERSION=${REGISTRAR_VERSION:-v2.17.0}
REGISTRAR_PSEUDO=${REGISTRAR_PSEUDO:-}
PAUSE_REF=${PAUSE_REF:-registry.local/pause:3.10}
BUSYBOX_REF=${BUSYBOX_REF:-registry.local/busybox:stowage}
APT_PACKAGES="runc containernetworking-plugins catatonit busybox-static iproute2 iptables conntrack"

here=$(cd "$(dirname "$0")" && pwd)
set_name="k8s-${K8S_VERSION}"
cache="${HOME}/.cache/stowage/e2e/${set_name}"
bin="${cache}/bin"
images="${cache}/images"
export PATH="$PATH:/usr/local/go/bin"
export GOFLAGS=-mod=mod
export CGO_ENABLED=0

log() { echo "e2e-node-tools: $*" >&2; }

PROGRAMS="kubelet kube-proxy kubectl containerd ctr containerd-shim-runc-v2"
[ -n "$REGISTRAR_PSEUDO" ] && PROGRAMS="$PROGRAMS csi-node-driver-registrar"
IMAGES="pause.tar busybox.tar"

missing_packages() {
  local p out=""
  for p in $APT_PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || out="$out $p"
  done
  echo "$out"
}

if [ "${1:-}" = "--check" ]; then  # exit 0 when every program, image and package is there
  for p in $PROGRAMS; do [ -x "${bin}/${p}" ] || exit 1; done
  for i in $IMAGES; do [ -s "${images}/${i}" ] || exit 1; done
  [ -z "$(missing_packages)" ] || exit 1
  exit 0
fi

mkdir -p "$bin" "$images"
total_started=$(date +%s)

# --- Debian packages --------------------------------------------------------------------------
need=$(missing_packages)
if [ -n "$need" ]; then
  log "installing${need} with apt"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need >/dev/null
fi

# --- Go programs ------------------------------------------------------------------------------
# k8s_wrapper -> prints the k8s.io/kubernetes wrapper directory, made as build.sh makes it unless
# build.sh already did (then it is reused untouched, so both scripts share one go.sum).
k8s_wrapper() {
  local dir="${cache}/src/kubernetes"
  if grep -qx "require k8s.io/kubernetes ${K8S_VERSION}" "${dir}/go.mod" 2>/dev/null; then
    echo "$dir"
    return
  fi
  mkdir -p "$dir"
  local gomod staging="v0.${K8S_VERSION#v1.}"
  gomod=$(cd "$dir" && go mod download -json "k8s.io/kubernetes@${K8S_VERSION}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  python3 - "$gomod" "$staging" "$K8S_VERSION" >"${dir}/go.mod" <<'PY'
import re, sys
gomod, staging, version = sys.argv[1:]
text = open(gomod).read()
go_line = re.search(r"^go (\S+)", text, re.M).group(1)
block = "\n".join(re.findall(r"^replace \((.*?)^\)", text, re.M | re.S))
olds = re.findall(r"^\s*(\S+)\s+=>\s+\./staging/", block, re.M)
print(f"module stowage.local/e2e/kubernetes\n\ngo {go_line}\n\nrequire k8s.io/kubernetes {version}\n")
for old in olds:
    print(f"replace {old} => {old} {staging}")
PY
  echo "$dir"
}

# plain_wrapper NAME MODULE VERSION -> a wrapper that only requires MODULE@VERSION
plain_wrapper() {
  local dir="${cache}/src/$1"
  mkdir -p "$dir"
  if ! grep -qx "require $2 $3" "${dir}/go.mod" 2>/dev/null; then
    local go_line
    go_line=$(cd "$dir" && go mod download -json "$2@$3" | python3 -c '
import json, re, sys
print(re.search(r"^go (\S+)", open(json.load(sys.stdin)["GoMod"]).read(), re.M).group(1))')
    printf 'module stowage.local/e2e/%s\n\ngo %s\n\nrequire %s %s\n' "$1" "$go_line" "$2" "$3" >"${dir}/go.mod"
  fi
  echo "$dir"
}

build() {  # build OUT DIR PKG LDFLAGS [TAGS]
  local out=$1 dir=$2 pkg=$3 ldflags=$4 tags=${5:-}
  if [ -x "${bin}/${out}" ]; then
    log "${out} cached"
    return
  fi
  local started
  started=$(date +%s)
  log "building ${out} (${pkg})"
  (cd "$dir" && go build -trimpath -tags "$tags" -ldflags "-s -w ${ldflags}" -o "${bin}/${out}.tmp" "$pkg")
  mv "${bin}/${out}.tmp" "${bin}/${out}"
  log "built ${out} in $(( $(date +%s) - started ))s"
}

k8s_stamp="-X k8s.io/component-base/version.gitVersion=${K8S_VERSION} -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$(echo "$K8S_VERSION" | cut -d. -f2) -X k8s.io/component-base/version.gitTreeState=clean"
# kube-proxy gives the node's pods the `kubernetes` Service; kubectl applies the examples.
for cmd in kubelet kube-proxy kubectl; do
  if [ -x "${bin}/${cmd}" ]; then log "${cmd} cached"; continue; fi
  build "$cmd" "$(k8s_wrapper)" "k8s.io/kubernetes/cmd/${cmd}" "$k8s_stamp"
done

ctd_module=github.com/containerd/containerd/v2
ctd_stamp="-X ${ctd_module}/version.Version=${CONTAINERD_VERSION} -X ${ctd_module}/version.Revision=module-proxy -X ${ctd_module}/version.Package=${ctd_module}"
ctd_dir=""
for cmd in containerd ctr containerd-shim-runc-v2; do
  if [ -x "${bin}/${cmd}" ]; then log "${cmd} cached"; continue; fi
  [ -n "$ctd_dir" ] || ctd_dir=$(plain_wrapper containerd "$ctd_module" "$CONTAINERD_VERSION")
  build "$cmd" "$ctd_dir" "${ctd_module}/cmd/${cmd}" "$ctd_stamp" "no_btrfs no_devmapper no_zfs"
done

if [ -n "$REGISTRAR_PSEUDO" ] && [ ! -x "${bin}/csi-node-driver-registrar" ]; then
  reg_module=github.com/kubernetes-csi/node-driver-registrar
  reg_dir=$(plain_wrapper registrar "$reg_module" "$REGISTRAR_PSEUDO")
  build csi-node-driver-registrar "$reg_dir" "${reg_module}/cmd/csi-node-driver-registrar" "-X main.version=${REGISTRAR_VERSION}"
fi

# --- images -----------------------------------------------------------------------------------
image() {  # image FILE REF ARGS...
  local file=$1 ref=$2
  shift 2
  if [ -s "${images}/${file}" ]; then
    log "image ${file} cached"
    return
  fi
  python3 "${here}/mkimage.py" --ref "$ref" --out "${images}/${file}.tmp" "$@" >&2
  mv "${images}/${file}.tmp" "${images}/${file}"
  log "made image ${ref} -> ${images}/${file}"
}
image pause.tar "$PAUSE_REF" --static /usr/bin/catatonit:/catatonit --entrypoint /catatonit,-P
image busybox.tar "$BUSYBOX_REF" --busybox /bin/busybox --cmd /bin/sh

{
  echo "kubelet ${K8S_VERSION}"
  echo "kube-proxy ${K8S_VERSION}"
  echo "kubectl ${K8S_VERSION}"
  echo "containerd ${CONTAINERD_VERSION}"
  [ -n "$REGISTRAR_PSEUDO" ] && echo "csi-node-driver-registrar ${REGISTRAR_VERSION} (${REGISTRAR_PSEUDO})"
  echo "image ${PAUSE_REF} ${images}/pause.tar"
  echo "image ${BUSYBOX_REF} ${images}/busybox.tar"
} >"${cache}/node-versions"
[ -z "$REGISTRAR_PSEUDO" ] && log "csi-node-driver-registrar skipped: the module proxy here refuses github.com/kubernetes-csi/node-driver-registrar (403); tests/e2e/registrar.py stands in. Set REGISTRAR_PSEUDO=v0.0.0-<UTC time>-<12 hex> to build it"
log "node tools ready in $(( $(date +%s) - total_started ))s"
echo "$bin"
