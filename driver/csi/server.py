"""Build the services for a mode, serve them on a unix or tcp endpoint, stop gracefully."""

from __future__ import annotations

import logging
import os
import stat
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc

from csi_proto import csi_pb2_grpc
from driver.config import Config, Mode
from driver.core.controller import ControllerCore
from driver.core.node import NodeCore
from driver.core.pool import PoolContext
from driver.core.reconcile import reconcile
from driver.csi.controller import ControllerServicer
from driver.csi.identity import IdentityServicer
from driver.csi.interceptors import CallInterceptor
from driver.csi.node import NodeServicer
from driver.errors import InvalidArgument
from driver.host.exec import SubprocessRunner
from driver.host.fs import Filesystems
from driver.host.loop import LoopManager
from driver.host.mounter import Mounter
from driver.host.system import SystemHost
from driver.metrics import Metrics, PoolSample
from driver.storage.image import ImagePool
from driver.storage.locks import KeyedLocks
from driver.storage.store import Store

log = logging.getLogger(__name__)


def parse_endpoint(endpoint: str) -> tuple[str, str]:
    """('unix', path) or ('tcp', host:port)."""
    if endpoint.startswith("unix://"):
        path = endpoint[len("unix://") :]
        if not path.startswith("/"):
            raise InvalidArgument(f"unix endpoint needs an absolute path: {endpoint}")
        return "unix", path
    if endpoint.startswith("tcp://"):
        return "tcp", endpoint[len("tcp://") :]
    raise InvalidArgument(f"endpoint must start with unix:// or tcp://, got {endpoint!r}")


def open_pool(cfg: Config) -> PoolContext:
    runner = SubprocessRunner()
    host = SystemHost()
    backend = ImagePool(cfg.pool_dir, reserved_bytes=cfg.reserved_bytes)
    store = Store(os.path.join(cfg.pool_dir, "meta.db"), before_write=backend.keep_metadata_room)
    return PoolContext(
        node_id=cfg.node_id,
        store=store,
        backend=backend,
        locks=KeyedLocks(),
        loops=LoopManager(runner),
        mounter=Mounter(runner, host),
        fs=Filesystems(runner),
        host=host,
        max_volumes_per_node=cfg.max_volumes_per_node,
        loop_sector_size=cfg.loop_sector_size,
    )


def _pool_sample(ctx: PoolContext) -> PoolSample | None:
    try:
        usage = ctx.backend.usage()
        volumes, snapshots = ctx.store.counts()
        loops = [lo for lo in ctx.loops.devices() if ctx.backend.owns(lo.backing_file)]
    except Exception:
        log.exception("could not sample the pool for metrics")
        return None
    on = sum(1 for lo in loops if lo.direct_io)
    return PoolSample(
        usage.total_bytes, usage.available_bytes, volumes, snapshots, on, len(loops) - on
    )


@dataclass
class Running:
    server: grpc.Server
    endpoint: tuple[str, str]
    pool: PoolContext | None
    ready: threading.Event

    def stop(self, grace: float) -> None:
        self.server.stop(grace).wait()
        kind, where = self.endpoint
        if kind == "unix":
            _remove_socket(where)
        if self.pool is not None:
            self.pool.store.close()


def _remove_socket(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


def start(cfg: Config, metrics: Metrics | None = None) -> Running:
    metrics = metrics or Metrics()
    ready = threading.Event()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="csi"),
        interceptors=[CallInterceptor(metrics)],
    )
    pool: PoolContext | None = None
    controller: ControllerCore | None = None
    if cfg.serves_pool:
        pool = open_pool(cfg)
        report = reconcile(pool, cfg.trash_grace)
        for problem in report.problems():
            log.error("reconcile: %s", problem)
        ctx = pool
        metrics.watch_pool(lambda: _pool_sample(ctx))
        controller = ControllerCore(pool)
        csi_pb2_grpc.add_NodeServicer_to_server(NodeServicer(NodeCore(pool)), server)

        def is_ready() -> bool:
            return ready.is_set() and ctx.backend.healthy() and ctx.store.healthy()
    else:

        def is_ready() -> bool:
            return ready.is_set()

    # Controller mode has no pool: the same servicer then serves what needs none.
    csi_pb2_grpc.add_ControllerServicer_to_server(ControllerServicer(controller), server)
    csi_pb2_grpc.add_IdentityServicer_to_server(IdentityServicer(ready=is_ready), server)
    kind, where = parse_endpoint(cfg.endpoint)
    if kind == "unix":
        os.makedirs(os.path.dirname(where), exist_ok=True)
        _remove_socket(where)
        old = os.umask(0o117)
        try:
            server.add_insecure_port("unix://" + where)
        finally:
            os.umask(old)
    else:
        server.add_insecure_port(where)
    server.start()
    if cfg.metrics_address:
        metrics.serve(cfg.metrics_address)
    ready.set()
    log.info(
        "stowage serving %s on %s (mode %s, node %s)",
        "pool " + cfg.pool_dir if pool else "no pool",
        cfg.endpoint,
        cfg.mode.value,
        cfg.node_id,
    )
    return Running(server, (kind, where), pool, ready)


__all__ = ["Mode", "Running", "parse_endpoint", "start"]
