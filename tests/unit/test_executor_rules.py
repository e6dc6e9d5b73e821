"""The daemon's executor rules, as pure functions."""

from __future__ import annotations

import pytest

from worker.daemon import should_scan


@pytest.mark.parametrize(
    ("handed_over", "was_busy", "now", "expected"),
    [
        (False, False, 0.0, True),  # an idle wait ended with nothing handed over
        (True, False, 0.0, False),  # handed-over work first; the scan waits for its interval
        (False, True, 0.0, False),  # the queue just ran dry: no empty claim per machine
        (True, True, 0.0, False),
        (True, True, 1.0, True),  # once per poll interval, however busy
        (False, True, 1.0, True),
    ],
)
def test_executors_scan_after_an_idle_wait_or_once_per_interval(
    handed_over: bool, was_busy: bool, now: float, expected: bool
) -> None:
    assert (
        should_scan(handed_over=handed_over, was_busy=was_busy, now=now, next_scan=1.0) is expected
    )
