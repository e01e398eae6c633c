# Stowage — developer entry points. `make run` and `make test` work on a fresh Debian machine
# as root: they install what they need (apt packages, .venv, csi-sanity, helm) first.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV := .venv
PY := $(VENV)/bin/python
# Every target finds the venv's tools (protoc plugins, ruff, mypy, pytest…) first and Go in its
# standard install location, whatever the caller's PATH holds: `make` works from a plain login
# shell on a fresh machine (`.ci/run` runs it with `env -i`).
GO_BIN := $(firstword $(wildcard /usr/local/go/bin))
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)$(if $(GO_BIN),:$(GO_BIN))
STATE ?= $(CURDIR)/.run
REPORTS ?= $(CURDIR)/reports
PROTO_GEN := $(PY) -m grpc_tools.protoc -I . --python_out=$(1) --grpc_python_out=$(1) --mypy_out=$(1) --mypy_grpc_out=$(1) csi_proto/csi.proto

.PHONY: help deps proto check-generated lint test test-unit test-integration test-faults test-hostile test-hardening e2e-tools e2e test-chart sanity run image image-lock image-docker test-image e2e-images clean bench bench-quick bench-deps

help:
	@echo "make run              start the driver on an embedded XFS pool and run the demo"
	@echo "make test             lint, check generated code, unit + integration + chart tests, csi-sanity"
	@echo "make proto            regenerate csi_proto/ stubs from csi_proto/csi.proto"
	@echo "make check-generated  prove the committed stubs match csi.proto"
	@echo "make image            the Stowage OCI image without a container engine (.image/)"
	@echo "make test-image       root, slow: two image builds give one digest; it runs"
	@echo "make test-hostile     the hostile input corpus (root): bad IDs, names, sizes, flags, paths, secrets"
	@echo "make bench            root: data path, snapshots, control path, scale, backup vs restic (~35 min)"
	@echo "make bench-quick      the same, short runs and smaller scale (< 5 min)"

deps:
	@tests/tools/install-deps.sh

proto: deps
	$(call PROTO_GEN,.)

check-generated: deps
	@tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	mkdir -p "$$tmp/csi_proto"; cp csi_proto/csi.proto "$$tmp/csi_proto/"; \
	(cd "$$tmp" && $(CURDIR)/$(PY) -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. \
	  --mypy_out=. --mypy_grpc_out=. csi_proto/csi.proto >/dev/null); \
	for f in csi_pb2.py csi_pb2.pyi csi_pb2_grpc.py csi_pb2_grpc.pyi; do \
	  diff -u "csi_proto/$$f" "$$tmp/csi_proto/$$f" >/dev/null || { echo "csi_proto/$$f is stale: run make proto"; exit 1; }; \
	done; echo "generated code matches csi_proto/csi.proto"

lint: deps
	$(VENV)/bin/ruff check driver tests bench harness deploy
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy deploy/image tests/e2e/livenessprobe.py tests/e2e/registrar.py
	$(VENV)/bin/lint-imports

test-unit: deps
	$(PY) -m pytest -q tests/unit

test-integration: deps
	$(PY) -m pytest -q tests/integration

test-faults: deps
	$(PY) -m pytest -q tests/hardening/test_faults.py

test-hardening: deps
	$(PY) -m pytest -q tests/hardening

e2e-tools: deps
	tests/e2e/tools/build.sh

e2e: deps
	STOWAGE_E2E_BIN=$$(tests/e2e/tools/build.sh | tail -n 1) \
	STOWAGE_HELM=$$(tests/tools/install-helm.sh | tail -n 1) \
	  $(PY) -m pytest -q -s -p no:cacheprovider tests/e2e

test-hostile: deps
	$(PY) -m pytest -q -p no:cacheprovider tests/hardening/test_hostile.py

test-chart: deps
	STOWAGE_HELM=$$(tests/tools/install-helm.sh | tail -n 1) $(PY) -m pytest -q tests/chart

sanity: deps
	STOWAGE_CSI_SANITY=$$(tests/tools/install-csi-sanity.sh | tail -n 1) REPORTS=$(REPORTS) \
	  $(PY) -m pytest -q tests/conformance

test: deps check-generated lint
	STOWAGE_CSI_SANITY=$$(tests/tools/install-csi-sanity.sh | tail -n 1) \
	STOWAGE_HELM=$$(tests/tools/install-helm.sh | tail -n 1) REPORTS=$(REPORTS) \
	  $(PY) -m pytest -q -p no:cacheprovider --junitxml=$(REPORTS)/pytest.xml tests

run: deps
	STATE=$(STATE) PY=$(PY) deploy/local/run.sh

bench-deps: deps
	@command -v fio >/dev/null || { apt-get update -qq && apt-get install -y -qq fio; }
	@command -v restic >/dev/null || { apt-get update -qq && apt-get install -y -qq restic; } || \
	  echo "restic could not be installed: make bench skips the restic comparison"
	@$(PY) -c 'import matplotlib' 2>/dev/null || $(VENV)/bin/pip install -q -e '.[dev,bench]'

bench: bench-deps
	$(PY) -m bench $(BENCH_ARGS)

bench-quick: bench-deps
	$(PY) -m bench --quick $(BENCH_ARGS)

# The Stowage image without a container engine (deploy/image/build.py): OCI layout .image/oci
# and archive .image/stowage-csi-<version>.oci.tar, from the lock files in deploy/image/.
image: deps
	@command -v mmdebstrap >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap >/dev/null; }
	$(PY) deploy/image/build.py build

image-lock: deps  # re-resolve deploy/image/debian.lock and requirements.lock from the mirrors
	@command -v mmdebstrap >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap >/dev/null; }
	$(PY) deploy/image/build.py lock

image-docker:  # the same image from deploy/Dockerfile, for machines with a container engine
	v=$$($(PY) -c 'import driver; print(driver.__version__)'); \
	docker build -f deploy/Dockerfile --build-arg VERSION=$$v --build-arg REVISION=$$(git rev-parse HEAD) -t stowage-csi:$$v .

test-image: deps  # root, slow (two cold builds): reproducible digest, skopeo/umoci/chroot checks
	@for p in mmdebstrap skopeo umoci; do command -v $$p >/dev/null || need="$$need $$p"; done; \
	if [ -n "$$need" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$need >/dev/null; fi
	STOWAGE_IMAGE_BUILD=1 $(PY) -m pytest -q -s -p no:cacheprovider tests/image

e2e-images: image  # sidecar, stand-in and Stowage images for the e2e node: ~/.cache/stowage/e2e/images
	PY=$(PY) tests/e2e/tools/build-images.sh >/dev/null
	@d=$$HOME/.cache/stowage/e2e/images; v=$$($(PY) -c 'import driver; print(driver.__version__)'); \
	cp .image/stowage-csi-$$v.oci.tar $$d/stowage-csi.oci.tar; echo docker.io/library/stowage-csi:$$v >$$d/stowage-csi.ref; \
	ls -l $$d

clean:
	rm -rf $(REPORTS) .image .mypy_cache .ruff_cache .pytest_cache

.PHONY: e2e-node-tools e2e-node e2e-node-smoke
e2e-node-tools: deps
	tests/e2e/tools/build-node.sh

# root: the control plane, a kubelet + kube-proxy + containerd node, and Stowage installed on it
# with `helm install` from the images of e2e-images (rebuilt first, so they are this checkout's)
e2e-node: deps e2e-images
	tests/e2e/tools/build-node.sh >/dev/null
	STOWAGE_E2E_NODE=1 STOWAGE_E2E_BIN=$$(tests/e2e/tools/build.sh | tail -n 1) \
	STOWAGE_HELM=$$(tests/tools/install-helm.sh | tail -n 1) \
	  $(PY) -m pytest -q -s -p no:cacheprovider tests/e2e_node

e2e-node-smoke: deps  # root: containerd + kubelet in a netns, a static busybox pod, no apiserver
	tests/e2e/tools/build-node.sh
	$(PY) -m tests.e2e.node_smoke
