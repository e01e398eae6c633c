"""Shared fixtures for the root tiers: a real pool on a loop-mounted image and a driver process,
both from the development harness (`harness/`, whose docstring lists its names).

Every fixture cleans up after itself even when the test fails: mounts under the test's own
temporary directory are unmounted, loop devices backed by its files are detached, and only then
is the directory removed. Processes are stopped by the PID the fixture started.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from driver.ctl.client import Client
from harness import DriverProcess, Pool, make_pool

# The control-plane tier needs binaries `make e2e-tools` builds (tens of minutes cold); it runs
# through `make e2e`, which points STOWAGE_E2E_BIN at them, not as part of `make test`. The node
# tier (a kubelet and containerd besides) runs only through `make e2e-node`.
collect_ignore = [] if os.environ.get("STOWAGE_E2E_BIN") else ["e2e"]
if not os.environ.get("STOWAGE_E2E_NODE"):
    collect_ignore.append("e2e_node")
# Building the image twice (reproducibility) is slow: `make test-image` sets STOWAGE_IMAGE_BUILD.
if os.environ.get("STOWAGE_IMAGE_BUILD") != "1":
    collect_ignore.append("image/test_build.py")


@pytest.fixture
def pool() -> Iterator[Pool]:
    assert os.geteuid() == 0, "the integration tiers need root (loop devices, mkfs, mount)"
    made, teardown = make_pool()
    try:
        yield made
    finally:
        teardown()


@pytest.fixture
def driver(pool: Pool) -> Iterator[DriverProcess]:
    proc = DriverProcess(pool)
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def client(driver: DriverProcess) -> Iterator[Client]:
    c = driver.start()
    try:
        yield c
    finally:
        c.close()
