"""Keyed try-locks: one operation per volume, snapshot or name at a time; the loser gets ABORTED."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from driver.errors import Aborted


class KeyedLocks:
    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._held: set[str] = set()

    @contextmanager
    def hold(self, *keys: str) -> Iterator[None]:
        """Take every key or none; raise Aborted if any is busy."""
        wanted = sorted({k for k in keys if k})
        with self._guard:
            busy = [k for k in wanted if k in self._held]
            if busy:
                raise Aborted(f"an operation on {busy[0]} is already in progress; retry later")
            self._held.update(wanted)
        try:
            yield
        finally:
            with self._guard:
                self._held.difference_update(wanted)
