#!/usr/bin/env bash
# Build helm at a pinned version from the Go module proxy (go install), cached under
# ~/.cache/stowage/bin/helm-<version>. No-op when the binary is already cached.
# Prints the binary's absolute path on the last line of stdout; build output goes to stderr.
set -euo pipefail
VERSION=${HELM_VERSION:-v3.22.0}
# The Kubernetes version helm assumes when no cluster is reachable (helm template/lint):
# helm's own Makefile stamps it from its k8s.io/client-go requirement (v0.37.x for v3.22.0);
# a plain go install would leave the 1.20 fallback, which fails the chart's kubeVersion.
K8S_MAJOR=${HELM_K8S_MAJOR:-1}
K8S_MINOR=${HELM_K8S_MINOR:-37}
dir="${HOME}/.cache/stowage/bin/helm-${VERSION}-k8s${K8S_MAJOR}.${K8S_MINOR}"
bin="${dir}/helm"
if [ ! -x "$bin" ]; then
  command -v go >/dev/null || { echo "install-helm.sh: go is required to build helm ${VERSION}" >&2; exit 1; }
  echo "building helm ${VERSION} (go install, cached in ${dir}; a cold build takes a few minutes)" >&2
  started=$(date +%s)
  mkdir -p "$dir"
  ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=${VERSION}"
  for pkg in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
    ldflags+=" -X ${pkg}.k8sVersionMajor=${K8S_MAJOR} -X ${pkg}.k8sVersionMinor=${K8S_MINOR}"
  done
  GOBIN="$dir" GOFLAGS=-mod=mod CGO_ENABLED=0 go install -trimpath -ldflags "$ldflags" \
    "helm.sh/helm/v3/cmd/helm@${VERSION}" >&2
  "$bin" version --short >&2
  echo "built helm ${VERSION} in $(( $(date +%s) - started ))s" >&2
fi
echo "$bin"
