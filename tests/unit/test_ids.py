"""driver.ids: the one strict pattern every path is built from."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from driver import ids

ORACLE = re.compile(r"\A[vs]-[0-9a-f]{32}\Z")
BACKUP_ORACLE = re.compile(r"\Ab-[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?-[0-9a-f]{32}\Z")

near_ids = st.builds(
    lambda p, body, tail: p + body + tail,
    st.sampled_from(
        ["v-", "s-", "V-", "v_", "x-", "", "v", "-", "/v-", "../v-", "b-main-", "b--", "b-a/"]
    ),
    st.text(alphabet="0123456789abcdefABCDEF\n /.\x00g٣", min_size=30, max_size=34),
    st.sampled_from(["", "\n", ".img", "/", " ", "\x00"]),
)


@given(st.one_of(st.text(max_size=40), near_ids))
def test_random_text_accepted_only_when_it_matches(value: str) -> None:
    ok = bool(ORACLE.match(value))
    backup = bool(BACKUP_ORACLE.match(value))
    assert ids.is_volume_id(value) == (ok and value.startswith("v-"))
    assert ids.is_snapshot_id(value) == ((ok and value.startswith("s-")) or backup)
    assert ids.is_backup_snapshot_id(value) == backup


@given(st.from_regex(ORACLE, fullmatch=True))
def test_well_formed_ids_accepted_by_kind(value: str) -> None:
    assert ids.is_volume_id(value) is value.startswith("v-")
    assert ids.is_snapshot_id(value) is value.startswith("s-")


@given(st.from_regex(BACKUP_ORACLE, fullmatch=True))
def test_backup_ids_name_their_target(value: str) -> None:
    assert ids.is_snapshot_id(value) and ids.is_backup_snapshot_id(value)
    assert not ids.is_volume_id(value) and not ids.is_local_snapshot_id(value)
    target = ids.backup_target(value)
    assert target is not None and value == f"b-{target}-{value[-32:]}"


def test_backup_ids_refuse_unsafe_targets() -> None:
    good = "0a" * 16
    for bad in ["b-Main-" + good, "b--x-" + good, "b-x--" + good, "b-a/b-" + good,
                "b-" + "a" * 64 + "-" + good, "b-x-" + good + "\n", "b-x-" + good[:-1],
                "b-../x-" + good, "b-x-" + good.upper()]:
        assert not ids.is_snapshot_id(bad), bad
        assert ids.backup_target(bad) is None
    sid = ids.new_backup_snapshot_id("main-1")
    assert ids.backup_target(sid) == "main-1" and ids.is_snapshot_id(sid)


def test_new_ids_match_and_differ() -> None:
    v, s = ids.new_volume_id(), ids.new_snapshot_id()
    assert ids.is_volume_id(v) and not ids.is_snapshot_id(v)
    assert ids.is_snapshot_id(s) and not ids.is_volume_id(s)
    assert len({ids.new_volume_id() for _ in range(100)}) == 100


def test_trailing_newline_and_unicode_digits_rejected() -> None:
    body = "0" * 32
    assert ids.is_volume_id("v-" + body)
    assert not ids.is_volume_id("v-" + body + "\n")
    assert not ids.is_volume_id("v-" + "٣" * 32)  # Arabic-Indic digits are not [0-9]
    assert not ids.is_volume_id("v-" + "A" * 32)
