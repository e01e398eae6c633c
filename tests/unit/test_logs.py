"""driver.logs: a string from a request cannot start a log line of its own."""

from __future__ import annotations

import json
import logging

import pytest

from driver import logs

FORGED = "x{sep}2001-01-01 00:00:00,000 INFO driver: FORGED"
SEPARATORS = ["\n", "\r", "\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\u2029"]


def _record(arg: str) -> logging.LogRecord:
    return logging.LogRecord("driver.rpc", logging.INFO, __file__, 1, "volume %s", (arg,), None)


@pytest.mark.parametrize("sep", SEPARATORS, ids=[hex(ord(s)) for s in SEPARATORS])
def test_text_lines_cannot_be_forged(sep: str) -> None:
    line = logs.TextFormatter("%(levelname)s %(name)s: %(message)s").format(
        _record(FORGED.format(sep=sep))
    )
    assert len(line.splitlines()) == 1, line
    assert "FORGED" in line and "ボ" in logs.escape_controls("ボ")


@pytest.mark.parametrize("sep", SEPARATORS, ids=[hex(ord(s)) for s in SEPARATORS])
def test_json_lines_are_ascii_and_round_trip(sep: str) -> None:
    value = FORGED.format(sep=sep) + " ボリューム"
    line = logs.JsonFormatter().format(_record(value))
    assert line.isascii() and len(line.splitlines()) == 1
    assert json.loads(line)["msg"] == "volume " + value


def test_plain_text_is_unchanged() -> None:
    assert (
        logs.escape_controls("created v-1 as ボリューム/../x") == "created v-1 as ボリューム/../x"
    )
    assert logs.escape_controls("a\tb\x00") == "a\\tb\\x00"
