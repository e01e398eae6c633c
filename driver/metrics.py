"""Prometheus metrics: stowage_* operations, latency, pool capacity, volumes, loop devices, and
the off-node backups' traffic, durations, failures and per-volume freshness (docs/backup.md)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from driver import DRIVER_NAME, __version__

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
#: Backup jobs take seconds to hours.
JOB_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600)


@dataclass(frozen=True)
class PoolSample:
    capacity_bytes: int
    available_bytes: int
    volumes: int
    snapshots: int
    loops_dio_on: int
    loops_dio_off: int
    provisioned_bytes: int = 0
    allocated_bytes: int = 0
    reflink: bool = False
    trash_items: int = 0
    trash_bytes: int = 0
    reconcile_findings: dict[str, int] = field(default_factory=dict)
    pool_uuid: str = ""


def _pool_gauges(s: PoolSample) -> tuple[tuple[str, str, float], ...]:
    """The pool's unlabelled gauges: name, help, value."""
    return (
        ("stowage_pool_capacity_bytes", "Size of the pool filesystem.", s.capacity_bytes),
        (
            "stowage_pool_available_bytes",
            "Free pool space minus the reservation.",
            s.available_bytes,
        ),
        ("stowage_volumes", "Volumes recorded in the pool.", s.volumes),
        ("stowage_snapshots", "Snapshots recorded in the pool.", s.snapshots),
        (
            "stowage_pool_provisioned_bytes",
            "Sum of the sizes of all volumes (thin: may exceed the pool).",
            s.provisioned_bytes,
        ),
        (
            "stowage_pool_allocated_bytes",
            "Bytes the volume and snapshot images occupy (shared reflink extents count per image).",
            s.allocated_bytes,
        ),
        (
            "stowage_pool_shares_extents",
            "1 when snapshots and clones are reflink copies (XFS reflink=1, btrfs), else 0.",
            1 if s.reflink else 0,
        ),
        ("stowage_trash_items", "Files waiting in <pool>/trash.", s.trash_items),
        ("stowage_trash_bytes", "Bytes held by <pool>/trash.", s.trash_bytes),
    )


class _PoolCollector(Collector):
    def __init__(self, sample: Callable[[], PoolSample | None]) -> None:
        self._sample = sample

    def collect(self) -> Iterable[GaugeMetricFamily]:
        s = self._sample()
        if s is None:
            return
        for name, text, value in _pool_gauges(s):
            yield GaugeMetricFamily(name, text, value=value)
        loops = GaugeMetricFamily(
            "stowage_loop_devices",
            "Loop devices backing pool images, by direct I/O state.",
            labels=["direct_io"],
        )
        loops.add_metric(["on"], s.loops_dio_on)
        loops.add_metric(["off"], s.loops_dio_off)
        yield loops
        found = GaugeMetricFamily(
            "stowage_reconcile_findings",
            "What the last start-up reconciliation found or did, by kind.",
            labels=["kind"],
        )
        for kind, n in sorted(s.reconcile_findings.items()):
            found.add_metric([kind], n)
        yield found
        if s.pool_uuid:
            ident = GaugeMetricFamily(
                "stowage_pool_info", "The pool's identity (pool.json).", labels=["pool_uuid"]
            )
            ident.add_metric([s.pool_uuid], 1)
            yield ident


class BackupMetrics:
    """What the node's backup jobs did: uploads, restores and verifies (scrubs)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.read_bytes = Counter(
            "stowage_backup_read_bytes", "Bytes read from snapshot images by uploads.",
            ["target"], registry=r,
        )
        self.uploaded_bytes = Counter(
            "stowage_backup_uploaded_bytes",
            "Bytes sent to the object store by uploads (after dedup, compression, encryption).",
            ["target"], registry=r,
        )
        self.downloaded_bytes = Counter(
            "stowage_backup_downloaded_bytes",
            "Bytes fetched from the object store by restores.",
            ["target"], registry=r,
        )
        self.duration = Histogram(
            "stowage_backup_job_duration_seconds",
            "Duration of finished backup jobs by kind (upload, restore, verify).",
            ["kind"], buckets=JOB_BUCKETS, registry=r,
        )
        self.failures = Counter(
            "stowage_backup_failures",
            "Failed backup jobs by kind and error (an upload retried later counts each time).",
            ["kind", "code"], registry=r,
        )
        self.damaged_chunks = Counter(
            "stowage_backup_verify_damaged_chunks",
            "Chunks a verify found missing or failing authentication.", ["target"], registry=r,
        )
        self.last_success = Gauge(
            "stowage_backup_last_success_timestamp_seconds",
            "When the newest backup of a volume became durable (Unix time).",
            ["volume"], registry=r,
        )
        self.last_verify = Gauge(
            "stowage_backup_last_verify_timestamp_seconds",
            "When the newest backup of a volume was last verified (Unix time).",
            ["volume"], registry=r,
        )
        self.last_verify_ok = Gauge(
            "stowage_backup_last_verify_ok",
            "1 when the last verify of a volume's newest backup found every chunk intact, else 0.",
            ["volume"], registry=r,
        )
        self.in_progress = Gauge(
            "stowage_backup_jobs_running", "Backup jobs running now by kind.", ["kind"],
            registry=r,
        )


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.backup = BackupMetrics(self.registry)
        self.operations = Counter(
            "stowage_operations",
            "CSI calls by method and gRPC code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "stowage_operation_duration_seconds",
            "CSI call latency by method.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

        self.build = Info("stowage_build", "Driver version.", registry=self.registry)
        self.build.info({"version": __version__, "driver": DRIVER_NAME})

    def observe(self, method: str, code: str, seconds: float) -> None:
        self.operations.labels(method, code).inc()
        self.latency.labels(method).observe(seconds)

    def watch_pool(self, sample: Callable[[], PoolSample | None]) -> None:
        self.registry.register(_PoolCollector(sample))

    def serve(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        start_http_server(int(port), addr=host or "0.0.0.0", registry=self.registry)  # noqa: S104
