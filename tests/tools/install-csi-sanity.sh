#!/usr/bin/env bash
# Build csi-sanity at a pinned version from the Go module proxy, cached under ~/.cache/stowage.
# Prints the binary's absolute path on the last line.
set -euo pipefail
VERSION=${CSI_SANITY_VERSION:-v5.5.0}
dir="${HOME}/.cache/stowage/bin/csi-sanity-${VERSION}"
bin="${dir}/csi-sanity"
if [ ! -x "$bin" ]; then
  echo "building csi-sanity ${VERSION} (go install, cached in ${dir})" >&2
  started=$(date +%s)
  mkdir -p "$dir"
  GOBIN="$dir" GOFLAGS=-mod=mod go install "github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@${VERSION}" >&2
  echo "built csi-sanity in $(( $(date +%s) - started ))s" >&2
fi
echo "$bin"
