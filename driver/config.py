"""Command-line flags become one frozen configuration."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Mode(enum.StrEnum):
    ALL = "all"
    NODE = "node"
    CONTROLLER = "controller"


@dataclass(frozen=True)
class Config:
    endpoint: str
    mode: Mode
    node_id: str
    pool_dir: str
    metrics_address: str = ""
    log_level: str = "info"
    log_format: str = "text"
    max_volumes_per_node: int = 0
    reserved_bytes: int = 0
    loop_sector_size: int = 4096
    shutdown_grace: float = 30.0
    trash_grace: float = 7 * 86400.0
    workers: int = 16
    pool_require_mountpoint: bool = False
    store_backup_interval: float = 3600.0  # seconds between online copies of meta.db; 0 = off
    # Off-node backups (docs/backup.md): target specs NAME=s3://BUCKET[/PREFIX]?endpoint=URL,
    # the repository key file, the owner recorded in manifests, and per-node limits.
    backup_targets: tuple[str, ...] = ()
    backup_key_file: str = ""
    backup_cluster_id: str = "default"
    backup_workers: int = 4  # parallel chunk transfers of one upload or restore
    backup_max_concurrent: int = 2  # uploads and restores running at once on this node
    backup_rate_limit: int = 0  # bytes per second shared by all transfers; 0 = unlimited
    # ModifyVolume in a cluster: watch PersistentVolumes for their VolumeAttributesClass
    # (driver.core.vacwatch), with in-cluster credentials or this kubeconfig.
    watch_volume_attributes: bool = False
    kubeconfig: str = ""
    backup_verify_interval: float = 0.0  # seconds between scrubs of each volume's newest backup

    @property
    def serves_pool(self) -> bool:
        return self.mode in (Mode.ALL, Mode.NODE)
