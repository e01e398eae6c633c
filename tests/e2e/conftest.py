"""The control-plane end-to-end tier (issue 4): `make e2e` after `make e2e-tools`.

One control plane (etcd, kube-apiserver, kube-controller-manager), a loopback S3 (weed mini) as
the backup target, one node-mode driver, one controller-mode driver and the chart's sidecars
(rendered with backup values, so the controller's node-independent csi-snapshotter too), each
sidecar authenticating with a token of its chart ServiceAccount, for the whole session; torn
down (processes by PID, mounts, loops, files) even when something fails. There is no kubelet
here: the Node and CSINode are created as a kubelet would (tests/e2e_node/ has a real one).
`make test` does not collect this directory."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.cluster import E2E, fake_node, no_rbac_denials, stowage_world

__all__ = ["no_rbac_denials"]


@pytest.fixture(scope="session")
def e2e() -> Iterator[E2E]:
    with stowage_world(fake_node, backups=True) as e:
        yield e
