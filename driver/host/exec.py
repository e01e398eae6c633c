"""Run external commands: argv lists only, never a shell, always a timeout."""

from __future__ import annotations

import logging
import subprocess
import time
from dataclasses import dataclass
from typing import Protocol

from driver.errors import CommandFailed, Internal

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 300.0


@dataclass(frozen=True)
class Result:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str


class Runner(Protocol):
    def run(
        self, argv: list[str], *, check: bool = True, timeout: float = DEFAULT_TIMEOUT
    ) -> Result: ...


class SubprocessRunner:
    """The real runner. `check=True` raises CommandFailed on a non-zero exit."""

    def run(
        self, argv: list[str], *, check: bool = True, timeout: float = DEFAULT_TIMEOUT
    ) -> Result:
        if not argv or not all(isinstance(a, str) for a in argv):
            raise Internal(f"bad argv {argv!r}")
        started = time.monotonic()
        try:
            proc = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except FileNotFoundError as exc:
            raise Internal(f"{argv[0]} is not installed on this node") from exc
        except subprocess.TimeoutExpired as exc:
            raise Internal(f"{argv[0]} did not finish within {timeout:.0f}s") from exc
        log.debug("exec %s -> %d in %.3fs", argv, proc.returncode, time.monotonic() - started)
        result = Result(argv, proc.returncode, proc.stdout, proc.stderr)
        if check and proc.returncode != 0:
            raise CommandFailed(argv, proc.returncode, proc.stdout, proc.stderr)
        return result
