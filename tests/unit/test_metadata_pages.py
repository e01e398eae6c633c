"""SnapshotMetadata paging (driver/core/metadata.py): ranges cut at starting_offset, max_results
per message, at least one message, nothing past the snapshot's size."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from driver.backup.extents import Range, merge
from driver.core.metadata import _clip, _pages


def test_pages_cut_at_the_offset_and_split_by_max_results() -> None:
    ranges = [Range(0, 10), Range(20, 10), Range(40, 10), Range(60, 10)]
    assert list(_pages(ranges, 25, 2)) == [[Range(25, 5), Range(40, 10)], [Range(60, 10)]]
    assert list(_pages(ranges, 0, 4)) == [ranges]
    assert list(_pages(ranges, 70, 3)) == [[]]  # nothing left: one empty message
    assert list(_pages([], 0, 5)) == [[]]


def test_clip_drops_and_cuts_past_the_size() -> None:
    assert _clip([Range(0, 10), Range(90, 20), Range(120, 5)], 100) == [
        Range(0, 10),
        Range(90, 10),
    ]


@given(
    st.lists(st.tuples(st.integers(0, 1000), st.integers(1, 50)), max_size=30),
    st.integers(0, 1100),
    st.integers(1, 7),
)
def test_pages_cover_exactly_the_bytes_from_the_offset(
    raw: list[tuple[int, int]], offset: int, max_results: int
) -> None:
    ranges = merge([Range(o, n) for o, n in raw])
    pages = list(_pages(ranges, offset, max_results))
    assert pages and all(len(p) <= max_results for p in pages)
    flat = [r for p in pages for r in p]
    want = {b for r in ranges for b in range(r.offset, r.end) if b >= offset}
    got = {b for r in flat for b in range(r.offset, r.end)}
    assert got == want
    assert [r.offset for r in flat] == sorted(r.offset for r in flat)
