"""Prometheus metrics: stowage_* operations, latency, pool capacity, volumes, loop devices."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


@dataclass(frozen=True)
class PoolSample:
    capacity_bytes: int
    available_bytes: int
    volumes: int
    snapshots: int
    loops_dio_on: int
    loops_dio_off: int


class _PoolCollector(Collector):
    def __init__(self, sample: Callable[[], PoolSample | None]) -> None:
        self._sample = sample

    def collect(self) -> Iterable[GaugeMetricFamily]:
        s = self._sample()
        if s is None:
            return
        yield GaugeMetricFamily(
            "stowage_pool_capacity_bytes", "Size of the pool filesystem.", value=s.capacity_bytes
        )
        yield GaugeMetricFamily(
            "stowage_pool_available_bytes",
            "Free pool space minus the reservation.",
            value=s.available_bytes,
        )
        yield GaugeMetricFamily("stowage_volumes", "Volumes recorded in the pool.", value=s.volumes)
        yield GaugeMetricFamily(
            "stowage_snapshots", "Snapshots recorded in the pool.", value=s.snapshots
        )
        loops = GaugeMetricFamily(
            "stowage_loop_devices",
            "Loop devices backing pool images, by direct I/O state.",
            labels=["direct_io"],
        )
        loops.add_metric(["on"], s.loops_dio_on)
        loops.add_metric(["off"], s.loops_dio_off)
        yield loops


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
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

    def observe(self, method: str, code: str, seconds: float) -> None:
        self.operations.labels(method, code).inc()
        self.latency.labels(method).observe(seconds)

    def watch_pool(self, sample: Callable[[], PoolSample | None]) -> None:
        self.registry.register(_PoolCollector(sample))

    def serve(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        start_http_server(int(port), addr=host or "0.0.0.0", registry=self.registry)  # noqa: S104
