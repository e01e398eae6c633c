"""Logging set-up: text for people, JSON lines for collectors.

Requests carry strings a PV, PVC or StorageClass author chose (volume handles, parameters, mount
options); a line break in one of them must not be able to forge a log line. The text format
escapes every control and line/paragraph separator character in the message; the JSON format is
pure ASCII, so no byte of a record can end the line early.
"""

from __future__ import annotations

import json
import logging
import time
import unicodedata

_LINE_BREAKING = {"Cc", "Zl", "Zp"}


def escape_controls(text: str) -> str:
    """`text` with control characters and Unicode line/paragraph separators escaped."""
    if all(unicodedata.category(ch) not in _LINE_BREAKING for ch in text):
        return text
    return "".join(
        ch.encode("unicode_escape").decode("ascii")
        if unicodedata.category(ch) in _LINE_BREAKING
        else ch
        for ch in text
    )


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=True)


class TextFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


def setup(level: str, fmt: str) -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
