"""driver.faults: crash points are inert unless named at start-up, and names are checked."""

from __future__ import annotations

import time

import pytest

from driver import faults


@pytest.fixture(autouse=True)
def _disarm() -> object:
    yield None
    faults.configure("")


def test_unarmed_points_do_nothing() -> None:
    faults.configure("")
    for name in faults.POINTS:
        faults.hit(name)


def test_unknown_point_is_refused_at_configure_and_at_hit() -> None:
    with pytest.raises(ValueError, match="unknown fault point"):
        faults.configure("create-volume:typo")
    with pytest.raises(KeyError):
        faults.hit("not-a-point")


@pytest.mark.parametrize(
    "spec", ["stage:mounted@0", "stage:mounted=explode", "stage:mounted=sleep:", "stage:mounted@x"]
)
def test_malformed_entries_are_refused(spec: str) -> None:
    with pytest.raises(ValueError):
        faults.parse(spec)


def test_parse_hit_number_and_actions() -> None:
    armed = faults.parse(" stage:mounted@2 , publish:bound=sleep:0.25,unstage:detached=crash")
    assert armed["stage:mounted"].nth == 2 and armed["stage:mounted"].sleep is None
    assert armed["publish:bound"].sleep == 0.25
    assert armed["unstage:detached"].sleep is None


def test_sleep_action_pauses_only_on_the_chosen_hit(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    faults.configure("publish:bound@2=sleep:0.5")
    faults.hit("publish:bound")
    faults.hit("publish:bound")
    faults.hit("publish:bound")
    assert slept == [0.5]


def test_hang_action_blocks_every_hit_from_the_chosen_one_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    blocked: list[int] = []
    monkeypatch.setattr(faults, "_hang_forever", lambda: blocked.append(len(blocked)))
    faults.configure("probe:answering@3=hang")
    for _ in range(5):
        faults.hit("probe:answering")
    assert blocked == [0, 1, 2]  # hits 3, 4 and 5


def test_hang_points_are_no_operation_the_crash_suite_walks() -> None:
    walked = {p for pts in faults.OPERATIONS.values() for p in pts}
    assert set(faults.HANG_POINTS) <= faults.POINTS
    assert not walked & set(faults.HANG_POINTS)


def test_crash_action_sends_sigkill_to_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    killed: list[tuple[int, int]] = []
    monkeypatch.setattr("os.kill", lambda pid, sig: killed.append((pid, sig)))
    faults.configure("stage:formatted")
    faults.hit("stage:formatted")
    import os
    import signal

    assert killed == [(os.getpid(), signal.SIGKILL)]


def test_every_operation_lists_points_once_in_order() -> None:
    for op, points in faults.OPERATIONS.items():
        assert len(set(points)) == len(points), op
        assert all(":" in p for p in points)
