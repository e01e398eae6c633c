"""How stowagectl prints: a table (or key: value lines) for people, JSON or YAML for scripts."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import yaml
from google.protobuf import json_format
from google.protobuf.message import Message

FORMATS = ("table", "json", "yaml")

Row = Mapping[str, Any]


def message(msg: Message) -> dict[str, Any]:
    """A protobuf message as plain data (field names as in the proto, defaults omitted)."""
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def size(n: int | str | None) -> str:
    """Bytes for people: 1.5Gi, 300Mi, 4096."""
    value = int(n or 0)
    for unit, scale in (("Ti", 1 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if value >= scale:
            q = value / scale
            return f"{q:.0f}{unit}" if q == int(q) else f"{q:.1f}{unit}"
    return str(value)


def table(rows: Sequence[Row], columns: Sequence[str]) -> str:
    """Left-aligned columns with an upper-case header; "-" for a missing cell."""
    cells = [[str(r.get(c, "") if r.get(c, "") != "" else "-") for c in columns] for r in rows]
    header = [c.upper() for c in columns]
    widths = [max(len(x) for x in col) for col in zip(header, *cells, strict=False)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(x.ljust(w) for x, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)


def emit(
    fmt: str, data: Any, *, rows: Sequence[Row] | None = None, columns: Sequence[str] = ()
) -> str:
    """`data` as JSON or YAML, or `rows` as a table (or `data` as key: value lines)."""
    if fmt == "json":
        return json.dumps(data, indent=2, sort_keys=True)
    if fmt == "yaml":
        return yaml.safe_dump(data, sort_keys=True, default_flow_style=False).rstrip()
    if rows is not None:
        return table(rows, columns) if rows else "(none)"
    if isinstance(data, Mapping):
        width = max((len(str(k)) for k in data), default=0)
        return "\n".join(f"{str(k) + ':':<{width + 1}} {_flat(v)}" for k, v in data.items())
    return str(data)


def _flat(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_flat(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(_flat(v) for v in value)
    return str(value)
