"""Volume and snapshot IDs: ours, random, and matched against one strict pattern before any path
is built from them."""

from __future__ import annotations

import re
import uuid

VOLUME_PREFIX = "v-"
SNAPSHOT_PREFIX = "s-"
_PATTERN = re.compile(r"^[vs]-[0-9a-f]{32}$")


def new_volume_id() -> str:
    return VOLUME_PREFIX + uuid.uuid4().hex


def new_snapshot_id() -> str:
    return SNAPSHOT_PREFIX + uuid.uuid4().hex


def is_volume_id(value: str) -> bool:
    return bool(_PATTERN.fullmatch(value)) and value.startswith(VOLUME_PREFIX)


def is_snapshot_id(value: str) -> bool:
    return bool(_PATTERN.fullmatch(value)) and value.startswith(SNAPSHOT_PREFIX)
