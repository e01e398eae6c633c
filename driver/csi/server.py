"""Build the services for a mode, serve them on a unix or tcp endpoint, stop gracefully."""

from __future__ import annotations

import logging
import os
import stat
import threading
from concurrent import futures
from dataclasses import dataclass, field

import grpc

from csi_proto import csi_pb2_grpc
from driver import flags
from driver.config import Config, Mode
from driver.core.backups import Backups
from driver.core.controller import ControllerCore
from driver.core.groups import GroupCore
from driver.core.metadata import MetadataCore
from driver.core.modify import REAPPLY_INTERVAL, IoLimitsCore
from driver.core.node import NodeCore
from driver.core.pool import PoolContext
from driver.core.rebuild import OpenedPool, open_pool_dir
from driver.core.reconcile import reconcile
from driver.core.remote import RemoteBackups
from driver.core.vacwatch import AttributesWatch, KubeClusterView
from driver.csi.controller import ControllerServicer
from driver.csi.groups import GroupControllerServicer
from driver.csi.identity import IdentityServicer
from driver.csi.interceptors import CallInterceptor
from driver.csi.metadata import SnapshotMetadataServicer
from driver.csi.node import NodeServicer
from driver.errors import InvalidArgument, Unavailable
from driver.host.exec import SubprocessRunner
from driver.host.fs import Filesystems
from driver.host.loop import LoopManager
from driver.host.mounter import Mounter
from driver.host.system import SystemHost
from driver.metrics import Metrics, PoolSample
from driver.storage.locks import KeyedLocks

log = logging.getLogger(__name__)


def parse_endpoint(endpoint: str) -> tuple[str, str]:
    """('unix', path) or ('tcp', host:port)."""
    try:
        return flags.endpoint(endpoint)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from exc


def open_pool(cfg: Config) -> tuple[PoolContext, OpenedPool]:
    runner = SubprocessRunner()
    host = SystemHost()
    opened = open_pool_dir(
        cfg.pool_dir,
        reserved_bytes=cfg.reserved_bytes,
        require_mountpoint=cfg.pool_require_mountpoint,
    )
    ctx = PoolContext(
        node_id=cfg.node_id,
        store=opened.store,
        backend=opened.backend,
        pool_uuid=opened.identity.uuid,
        locks=KeyedLocks(),
        loops=LoopManager(runner),
        mounter=Mounter(runner, host),
        fs=Filesystems(runner),
        host=host,
        max_volumes_per_node=cfg.max_volumes_per_node,
        loop_sector_size=cfg.loop_sector_size,
    )
    return ctx, opened


def _pool_sample(ctx: PoolContext, findings: dict[str, int]) -> PoolSample | None:
    try:
        usage = ctx.backend.usage()
        volumes, snapshots = ctx.store.counts()
        provisioned = ctx.store.provisioned_bytes()
        allocated = sum(
            ctx.backend.allocated_bytes(i)
            for i in ctx.backend.volume_ids() | ctx.backend.snapshot_ids()
        )
        trash = ctx.backend.trash()
        loops = [lo for lo in ctx.loops.devices() if ctx.backend.owns(lo.backing_file)]
    except Exception:
        log.exception("could not sample the pool for metrics")
        return None
    on = sum(1 for lo in loops if lo.direct_io)
    return PoolSample(
        usage.total_bytes,
        usage.available_bytes,
        volumes,
        snapshots,
        on,
        len(loops) - on,
        provisioned_bytes=provisioned,
        allocated_bytes=allocated,
        reflink=usage.reflink,
        trash_items=len(trash),
        trash_bytes=sum(t.allocated_bytes for t in trash),
        reconcile_findings=findings,
        pool_uuid=ctx.pool_uuid,
    )


@dataclass
class Running:
    server: grpc.Server
    endpoint: tuple[str, str]
    pool: PoolContext | None
    ready: threading.Event
    opened: OpenedPool | None = None
    stopping: threading.Event = field(default_factory=threading.Event)
    backups: Backups | None = None

    def stop(self, grace: float) -> None:
        self.stopping.set()
        self.server.stop(grace).wait()
        if self.backups is not None:
            self.backups.close()  # running uploads stop at their next chunk; resumed at start
        kind, where = self.endpoint
        if kind == "unix":
            _remove_socket(where)
        if self.opened is not None:
            self.opened.close()


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
    limits: IoLimitsCore | None = None
    view: KubeClusterView | None = None
    opened: OpenedPool | None = None
    backups: Backups | None = None
    remote: RemoteBackups | None = None
    kind, where = parse_endpoint(cfg.endpoint)
    if cfg.serves_pool:
        pool, opened = open_pool(cfg)
        try:
            report = reconcile(pool, cfg.trash_grace)
        except BaseException:
            opened.close()
            raise
        for problem in report.problems():
            log.error("reconcile: %s", problem)
        ctx = pool
        findings = report.counts()
        metrics.watch_pool(lambda: _pool_sample(ctx, findings))
        if cfg.backup_targets:
            try:
                backups = Backups.open(
                    pool,
                    cfg.backup_targets,
                    cfg.backup_key_file,
                    cluster_id=cfg.backup_cluster_id,
                    workers=cfg.backup_workers,
                    max_concurrent=cfg.backup_max_concurrent,
                    rate_limit=cfg.backup_rate_limit,
                    metrics=metrics.backup,
                )
            except BaseException:
                opened.close()
                raise
        controller = ControllerCore(pool, backups, cfg.backup_cluster_id)
        node = NodeCore(pool)
        limits = node.limits
        if cfg.watch_volume_attributes:
            try:
                view = KubeClusterView(cfg.kubeconfig)
            except Exception as exc:
                opened.close()
                raise Unavailable(
                    f"--watch-volume-attributes: cannot reach the Kubernetes API: {exc}"
                ) from exc
        csi_pb2_grpc.add_NodeServicer_to_server(NodeServicer(node), server)
        csi_pb2_grpc.add_GroupControllerServicer_to_server(
            GroupControllerServicer(GroupCore(controller)), server
        )
        csi_pb2_grpc.add_SnapshotMetadataServicer_to_server(
            SnapshotMetadataServicer(MetadataCore(pool)), server
        )

        def is_ready() -> bool:
            return ready.is_set() and ctx.backend.healthy() and ctx.store.healthy()
    else:
        if cfg.backup_targets:  # the node-independent work on backup snapshots (design.md)
            remote = RemoteBackups.open(
                cfg.backup_targets,
                cfg.backup_key_file,
                cluster_id=cfg.backup_cluster_id,
                workers=cfg.backup_workers,
            )

        def is_ready() -> bool:
            return ready.is_set()

    # Controller mode has no pool: the same servicer then serves what needs none.
    csi_pb2_grpc.add_ControllerServicer_to_server(
        ControllerServicer(controller, limits, remote), server
    )
    csi_pb2_grpc.add_IdentityServicer_to_server(
        IdentityServicer(ready=is_ready, pool=pool is not None), server
    )
    if cfg.metrics_address:
        try:
            metrics.serve(cfg.metrics_address)  # before the socket: a busy port leaves none
        except OSError:
            if opened is not None:
                opened.close()
            raise
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
    ready.set()
    log.info(
        "stowage serving %s on %s (mode %s, node %s)",
        "pool " + cfg.pool_dir if pool else "no pool",
        cfg.endpoint,
        cfg.mode.value,
        cfg.node_id,
    )
    running = Running(server, (kind, where), pool, ready, opened, backups=backups)
    if backups is not None:
        backups.resume()
        backups.start_scrub(cfg.backup_verify_interval)
    if pool is not None and cfg.store_backup_interval > 0:
        _start_store_backups(pool, cfg.store_backup_interval, running.stopping)
    if limits is not None:
        _start_limit_reapply(limits, running.stopping)
    if limits is not None and view is not None:
        watch = AttributesWatch(limits, view)
        threading.Thread(
            target=watch.run, args=(running.stopping,), name="vac-watch", daemon=True
        ).start()
    return running


def _start_limit_reapply(limits: IoLimitsCore, stopping: threading.Event) -> None:
    """Re-apply published volumes' I/O limits now and every REAPPLY_INTERVAL seconds: after a
    driver restart, and (cgroup v1) into the cgroups of containers started after the publish."""

    def loop() -> None:
        while True:
            try:
                limits.reapply()
            except Exception:  # a missed round must not stop the driver; the next one retries
                log.exception("could not re-apply I/O limits")
            if stopping.wait(REAPPLY_INTERVAL):
                return

    threading.Thread(target=loop, name="io-limits", daemon=True).start()


def _start_store_backups(ctx: PoolContext, interval: float, stopping: threading.Event) -> None:
    """Copy meta.db to <pool>/meta.db.backup now and every `interval` seconds (SQLite online
    backup: consistent, does not block writers for long). A copy that fails is logged."""
    dest = os.path.join(ctx.backend.root, "meta.db.backup")

    def loop() -> None:
        while True:
            try:
                ctx.store.backup_to(dest)
            except Exception as exc:  # noqa: BLE001 - a missed backup must not stop the driver
                log.warning("could not back up the metadata store to %s: %s", dest, exc)
            if stopping.wait(interval):
                return

    threading.Thread(target=loop, name="store-backup", daemon=True).start()


__all__ = ["Mode", "Running", "parse_endpoint", "start"]
