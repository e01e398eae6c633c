"""Off-node backups: extent diffs, the encrypted chunk repository on S3, the backup engine.

This package imports neither gRPC nor the generated CSI code (an import-linter contract); it
raises domain errors from driver.errors that the servicers map to gRPC codes.
"""

from __future__ import annotations

from driver.backup.engine import (
    BackupResult,
    GcReport,
    Progress,
    ProgressFn,
    Repository,
    SnapshotInfo,
    SnapshotRecord,
    VerifyReport,
)
from driver.backup.format import DEFAULT_CHUNK_SIZE, ChunkRef, Manifest
from driver.backup.keys import RepositoryKey
from driver.backup.s3 import Credentials, Store, Target, parse_target, parse_targets

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "BackupResult",
    "ChunkRef",
    "Credentials",
    "GcReport",
    "Manifest",
    "Progress",
    "ProgressFn",
    "Repository",
    "RepositoryKey",
    "SnapshotInfo",
    "SnapshotRecord",
    "Store",
    "Target",
    "VerifyReport",
    "parse_target",
    "parse_targets",
]
