"""A child process of the e2e tiers: started with its output in a log file, stopped by its PID."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from harness import read_log

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class Proc:
    name: str
    argv: list[str]
    log_path: str
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        with open(self.log_path, "ab") as out:
            self.popen = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env}, cwd=REPO, start_new_session=True,
            )  # fmt: skip
        return self

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM, then SIGKILL after `timeout` seconds; only this process, by its PID."""
        p = self.popen
        if p is None:
            return
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                print(f"{self.name} (pid {p.pid}) ignored SIGTERM for {timeout:.0f}s: SIGKILL")
                p.kill()
                p.wait()
        self.popen = None

    def log(self) -> str:
        return read_log(self.log_path)

    def tail(self, lines: int = 30) -> str:
        return "".join(self.log().splitlines(keepends=True)[-lines:])


class Fatal(RuntimeError):
    """Raised by a `wait` predicate to stop waiting at once (a process died)."""


def wait(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    every: float = 0.25,
    say: Callable[[str], None] = print,
) -> Any:
    """Poll until `predicate` returns something truthy; say what was awaited and how long.
    Exceptions other than Fatal count as "not yet" and the last one is reported on timeout."""
    started = time.monotonic()
    last: BaseException | None = None
    while time.monotonic() - started < timeout:
        try:
            got = predicate()
            if got:
                say(f"  waited {time.monotonic() - started:5.1f}s for {what}")
                return got
        except Fatal:
            raise
        except Exception as exc:
            last = exc
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last})")
