"""`stowage-csi`: parse flags, start the server, stop on SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import fields
from typing import NoReturn

from driver import DRIVER_NAME, __version__, faults, flags, logs
from driver.config import Config, Mode
from driver.errors import StowageError
from driver.host import memory
from driver.quantity import parse_bytes

log = logging.getLogger("driver")
_CLUSTER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class _Parser(argparse.ArgumentParser):
    """A bad flag is one line on stderr and exit status 2: no usage block, no traceback."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _checked(parse: Callable[[str], object], name: str) -> Callable[[str], object]:
    def check(text: str) -> object:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    check.__name__ = name
    return check


def parse(argv: list[str] | None = None) -> Config:
    p = _Parser(prog="stowage-csi", description=f"{DRIVER_NAME} CSI driver")
    p.add_argument(
        "--endpoint",
        default="unix:///run/stowage/csi.sock",
        help="unix:///path/csi.sock or tcp://host:port",
    )
    p.add_argument("--mode", choices=[m.value for m in Mode], default=Mode.ALL.value)
    p.add_argument("--node-id", default=os.environ.get("NODE_NAME") or socket.gethostname())
    p.add_argument("--pool-dir", default="/var/lib/stowage")
    p.add_argument(
        "--pool-require-mountpoint",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="refuse a --pool-dir that is not a mount point (a data disk that failed to mount)",
    )
    p.add_argument("--metrics-address", default="", help="host:port for /metrics; empty = off")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="text", choices=["text", "json"])
    p.add_argument("--max-volumes-per-node", type=int, default=0)
    p.add_argument(
        "--reserved-bytes",
        type=_checked(lambda text: parse_bytes(text, allow_zero=True), "size"),
        default=0,
        help="pool space kept free and never reported as capacity (a quantity: 0, 512Mi, 10Gi)",
    )
    p.add_argument(
        "--loop-sector-size",
        type=int,
        default=4096,
        choices=[512, 1024, 2048, 4096],
        help="logical sector size of loop devices for new volumes (kept per volume)",
    )
    p.add_argument(
        "--workers", type=int, default=16, help="gRPC worker threads (concurrent calls served)"
    )
    p.add_argument("--shutdown-grace", type=_checked(flags.duration, "duration"), default=30.0)
    p.add_argument(
        "--trash-grace",
        type=_checked(flags.duration, "duration"),
        default=7 * 86400.0,
        help="how long orphaned images stay in <pool>/trash before start-up removes them "
        "(seconds, or 90s, 15m, 12h, 7d)",
    )
    p.add_argument(
        "--store-backup-interval",
        type=_checked(flags.duration, "duration"),
        default=3600.0,
        help="how often meta.db is copied to <pool>/meta.db.backup (SQLite online backup); 0 = off",
    )
    p.add_argument(
        "--backup-target",
        action="append",
        default=[],
        metavar="NAME=s3://BUCKET[/PREFIX]?endpoint=URL[&region=R]",
        help="an S3-compatible backup target (repeatable); credentials from AWS_ACCESS_KEY_ID "
        "and AWS_SECRET_ACCESS_KEY",
    )
    p.add_argument(
        "--backup-key-file",
        default="",
        help="the backup repository key (32 random bytes, hex or base64); required with "
        "--backup-target",
    )
    p.add_argument(
        "--backup-cluster-id",
        default=os.environ.get("STOWAGE_CLUSTER_ID") or "default",
        help="this cluster's name, recorded in every manifest as its owner; a cluster never "
        "deletes another's backups (default: $STOWAGE_CLUSTER_ID or 'default')",
    )
    p.add_argument("--backup-workers", type=int, default=4,
                   help="parallel chunk transfers of one upload or restore")
    p.add_argument("--backup-max-concurrent", type=int, default=2,
                   help="uploads and restores running at once on this node")
    p.add_argument(
        "--backup-rate-limit",
        type=_checked(lambda text: parse_bytes(text, allow_zero=True), "quantity"),
        default=0,
        help="bytes per second shared by this node's backup transfers (a quantity: 50Mi); "
        "0 = unlimited",
    )
    p.add_argument(
        "--watch-volume-attributes",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="node and all modes: apply the VolumeAttributesClass that csi-resizer records on "
        "the PersistentVolumes of this pool's volumes (ModifyVolume in a cluster)",
    )
    p.add_argument(
        "--kubeconfig",
        default="",
        help="with --watch-volume-attributes: a kubeconfig file; empty = in-cluster credentials",
    )
    p.add_argument(
        "--backup-verify-interval",
        type=_checked(lambda text: flags.interval(text, minimum=1.0), "duration"),
        default=0.0,
        help="re-read and authenticate the newest backup of every volume this often (a "
        "duration: 24h, 7d); 0 = off",
    )
    p.add_argument("--version", action="version", version=f"stowage-csi {__version__}")
    a = p.parse_args(argv)
    if a.workers < 1:
        p.error("--workers must be at least 1")
    if a.max_volumes_per_node < 0:
        p.error("--max-volumes-per-node must not be negative")
    try:
        flags.endpoint(a.endpoint)
        if a.metrics_address:
            flags.address(a.metrics_address, what="--metrics-address")
    except ValueError as exc:
        p.error(str(exc))
    if not a.node_id.strip():
        p.error("--node-id must not be empty")
    if a.backup_workers < 1 or a.backup_max_concurrent < 1:
        p.error("--backup-workers and --backup-max-concurrent must be at least 1")
    if not _CLUSTER_ID.fullmatch(a.backup_cluster_id):
        p.error("--backup-cluster-id must be 1-63 letters, digits, '.' or '-'")
    if a.watch_volume_attributes and a.mode == Mode.CONTROLLER.value:
        p.error("--watch-volume-attributes needs a pool (--mode node or all)")
    if a.kubeconfig and not a.watch_volume_attributes:
        p.error("--kubeconfig is only used with --watch-volume-attributes")
    if a.backup_target:
        from driver.backup import parse_targets  # imports boto3: only when configured

        try:
            names = ", ".join(sorted(parse_targets(a.backup_target)))
        except StowageError as exc:
            p.error(str(exc))
        if not a.backup_key_file:
            p.error(
                f"backup target(s) {names} need --backup-key-file: backups are always encrypted"
            )
    # Every Config field is the flag of the same name; these are converted on the way.
    converted = {
        "mode": Mode(a.mode),
        "pool_dir": os.path.abspath(a.pool_dir),
        "backup_targets": tuple(a.backup_target),
    }
    wanted = {f.name for f in fields(Config)} - converted.keys()
    given = {n: getattr(a, n) for n in wanted if hasattr(a, n)}
    if wanted - given.keys():  # a field added without its flag
        raise AssertionError(f"no flag for {sorted(wanted - given.keys())}")
    return Config(**given, **converted)


def main(argv: list[str] | None = None) -> int:
    cfg = parse(argv)
    logs.setup(cfg.log_level, cfg.log_format)
    try:
        armed = faults.configure()
    except ValueError as exc:
        log.error("cannot start: %s", exc)
        return 2
    if armed:
        log.warning("fault injection armed (%s): %s", faults.ENV, ", ".join(armed))
    if cfg.backup_targets:
        memory.keep_large_buffers()
        from driver.core.backups import load_config

        try:  # the key file and the credentials, before anything else starts
            load_config(cfg.backup_targets, cfg.backup_key_file)
        except StowageError as exc:
            log.error("cannot start: %s", exc)
            return 2
    from driver.csi import server  # imported late: flag errors should not pay for gRPC start-up

    try:
        running = server.start(cfg)
    except (StowageError, OSError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s; finishing in-flight calls", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stop.wait()
    running.stop(cfg.shutdown_grace)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
