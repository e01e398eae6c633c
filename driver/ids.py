"""Volume and snapshot IDs: ours, random, and matched against one strict pattern before any path
or object key is built from them.

- volumes: ``v-<32 hex>``
- local snapshots: ``s-<32 hex>``
- group snapshots: ``g-<32 hex>`` (a VolumeGroupSnapshot; its members are local snapshots)
- backup snapshots: ``b-<target>-<32 hex>``, where <target> is the name of a backup target
  (``--backup-target NAME=...``: 1-63 lowercase letters, digits or '-', starting and ending with
  a letter or digit). The handle alone tells any node, or a node-independent controller, which
  target holds the backup's manifest (``manifests/<snapshot ID>`` there).
"""

from __future__ import annotations

import re
import uuid

VOLUME_PREFIX = "v-"
SNAPSHOT_PREFIX = "s-"
BACKUP_PREFIX = "b-"
GROUP_PREFIX = "g-"
TARGET_NAME = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_PATTERN = re.compile(r"^[vsg]-[0-9a-f]{32}$")
_BACKUP = re.compile(rf"^b-({TARGET_NAME})-[0-9a-f]{{32}}$")
_TARGET = re.compile(rf"^{TARGET_NAME}$")


def new_volume_id() -> str:
    return VOLUME_PREFIX + uuid.uuid4().hex


def new_snapshot_id() -> str:
    return SNAPSHOT_PREFIX + uuid.uuid4().hex


def new_group_snapshot_id() -> str:
    return GROUP_PREFIX + uuid.uuid4().hex


def is_group_snapshot_id(value: str) -> bool:
    return bool(_PATTERN.fullmatch(value)) and value.startswith(GROUP_PREFIX)


def new_backup_snapshot_id(target: str) -> str:
    if not is_target_name(target):
        raise ValueError(f"{target!r} is not a backup target name")
    return f"{BACKUP_PREFIX}{target}-{uuid.uuid4().hex}"


def is_target_name(value: str) -> bool:
    return isinstance(value, str) and bool(_TARGET.fullmatch(value))


def is_volume_id(value: str) -> bool:
    return bool(_PATTERN.fullmatch(value)) and value.startswith(VOLUME_PREFIX)


def is_local_snapshot_id(value: str) -> bool:
    return bool(_PATTERN.fullmatch(value)) and value.startswith(SNAPSHOT_PREFIX)


def is_backup_snapshot_id(value: str) -> bool:
    return bool(_BACKUP.fullmatch(value))


def is_snapshot_id(value: str) -> bool:
    """Either kind of snapshot: both have a local image named by the ID in the pool."""
    return is_local_snapshot_id(value) or is_backup_snapshot_id(value)


def backup_target(value: str) -> str | None:
    """The target name a backup snapshot ID names; None for anything else."""
    m = _BACKUP.fullmatch(value)
    return m.group(1) if m else None
