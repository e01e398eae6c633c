"""driver.ids: the one strict pattern every path is built from."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from driver import ids

ORACLE = re.compile(r"\A[vs]-[0-9a-f]{32}\Z")

near_ids = st.builds(
    lambda p, body, tail: p + body + tail,
    st.sampled_from(["v-", "s-", "V-", "v_", "x-", "", "v", "-", "/v-", "../v-"]),
    st.text(alphabet="0123456789abcdefABCDEF\n /.\x00g٣", min_size=30, max_size=34),
    st.sampled_from(["", "\n", ".img", "/", " ", "\x00"]),
)


@given(st.one_of(st.text(max_size=40), near_ids))
def test_random_text_accepted_only_when_it_matches(value: str) -> None:
    ok = bool(ORACLE.match(value))
    assert ids.is_volume_id(value) == (ok and value.startswith("v-"))
    assert ids.is_snapshot_id(value) == (ok and value.startswith("s-"))


@given(st.from_regex(ORACLE, fullmatch=True))
def test_well_formed_ids_accepted_by_kind(value: str) -> None:
    assert ids.is_volume_id(value) is value.startswith("v-")
    assert ids.is_snapshot_id(value) is value.startswith("s-")


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
