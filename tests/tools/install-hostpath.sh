#!/usr/bin/env bash
# The peer for `make bench`'s control-path comparison, cached under ~/.cache/stowage/bin.
#
# First choice: csi-driver-host-path's hostpathplugin at a pinned tag, built in a throwaway
# wrapper module that requires it and copies the replace lines of its go.mod (the module has
# k8s.io replace directives, so `go install …@tag` cannot build it).
# When the Go module proxy does not serve that module (it answered 403 "not available" on the
# machines this was written on), build tests/tools/hostpath-workalike instead: Stowage's own
# stand-in that does hostpathplugin's per-call work for Create/Delete of a mount volume.
# Prints "<kind> <binary>" on the last line, kind = hostpath-<tag> | hostpath-workalike.
set -euo pipefail
VERSION=${HOSTPATH_VERSION:-v1.17.0}
MODULE=github.com/kubernetes-csi/csi-driver-host-path
here=$(cd "$(dirname "$0")" && pwd)
cache="${HOME}/.cache/stowage/bin"

dir="${cache}/hostpath-${VERSION}"
bin="${dir}/hostpathplugin"
if [ -x "$bin" ]; then echo "hostpath-${VERSION} ${bin}"; exit 0; fi

work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
started=$(date +%s)
if info=$(cd "$work" && GOFLAGS=-mod=mod go mod download -json "${MODULE}@${VERSION}" 2>&1) \
   && gomod=$(printf '%s' "$info" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p') && [ -n "$gomod" ]; then
  echo "building hostpathplugin ${VERSION} in a wrapper module (cached in ${dir})" >&2
  goline=$(grep -m1 '^go ' "$gomod")
  {
    echo "module stowage.local/hostpath-wrapper"
    echo "$goline"
    echo "require ${MODULE} ${VERSION}"
    # Replace lines, single or inside a replace ( … ) block, exactly as the tag's go.mod has them.
    awk '/^replace \(/{b=1;next} b&&/^\)/{b=0;next} b{print "replace " $0} /^replace [^(]/{print}' "$gomod"
  } > "$work/go.mod"
  (cd "$work" && GOFLAGS=-mod=mod go get "${MODULE}/cmd/hostpathplugin@${VERSION}" >&2
   mkdir -p "$dir" && GOFLAGS=-mod=mod go build -o "$bin" "${MODULE}/cmd/hostpathplugin" >&2)
  echo "built hostpathplugin ${VERSION} in $(( $(date +%s) - started ))s" >&2
  echo "hostpath-${VERSION} ${bin}"
  exit 0
fi
echo "the Go module proxy does not serve ${MODULE}@${VERSION}: $(printf '%s' "$info" | grep -m1 -o '[0-9]\{3\} [A-Za-z ]*' || echo "$info" | tail -n1)" >&2

sum=$(cat "$here/hostpath-workalike/go.mod" "$here/hostpath-workalike/main.go" | sha256sum | cut -c1-12)
dir="${cache}/hostpath-workalike-${sum}"
bin="${dir}/hostpath-workalike"
if [ ! -x "$bin" ]; then
  echo "building the hostpath workalike (cached in ${dir})" >&2
  cp "$here/hostpath-workalike/go.mod" "$here/hostpath-workalike/main.go" "$work/"
  (cd "$work" && GOFLAGS=-mod=mod go mod tidy >&2 && mkdir -p "$dir" && go build -o "$bin" . >&2)
  echo "built the hostpath workalike in $(( $(date +%s) - started ))s" >&2
fi
echo "hostpath-workalike ${bin}"
