"""Flag values checked before anything is opened: durations, endpoints, listen addresses.

Each parser raises ValueError with a message fit for one line on stderr."""

from __future__ import annotations

import ipaddress
import re

_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)")


def duration(text: str) -> float:
    """`90`, `90s`, `15m`, `12h`, `7d`, `2w`, or a sum like `1h30m` → seconds (never negative)."""
    t = text.strip()
    if not t:
        raise ValueError("empty duration (use e.g. 90s, 15m, 12h, 7d)")
    total, pos = 0.0, 0
    for m in _DURATION.finditer(t):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(t):
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 15m, 12h, 7d)")
    return total


def interval(text: str, *, minimum: float) -> float:
    """A period for background work: a duration that is 0 (off) or at least `minimum` seconds."""
    seconds = duration(text)
    if 0 < seconds < minimum:
        raise ValueError(f"{text!r} is too short: use 0 (off) or at least {minimum:g}s")
    return seconds


def endpoint(text: str) -> tuple[str, str]:
    """('unix', absolute path) or ('tcp', host:port)."""
    if text.startswith("unix://"):
        path = text[len("unix://") :]
        if not path.startswith("/"):
            raise ValueError(
                "unix endpoint needs an absolute path, as in unix:///run/stowage/csi.sock: "
                f"{text!r}"
            )
        return "unix", path
    if text.startswith("tcp://"):
        address(text[len("tcp://") :], what="tcp endpoint")
        return "tcp", text[len("tcp://") :]
    raise ValueError(f"endpoint must be unix:///path/csi.sock or tcp://host:port, got {text!r}")


def address(text: str, *, what: str = "address") -> tuple[str, int]:
    """`host:port`, `:port` or `[v6]:port` with a port in 0..65535."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{what} must be host:port (port 0-65535), got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError as exc:
            raise ValueError(f"{what} {text!r}: {exc}") from exc
        host = host[1:-1]
    elif ":" in host or any(c.isspace() for c in host):
        raise ValueError(f"{what} must be host:port (write IPv6 as [addr]:port), got {text!r}")
    return host, int(port)
