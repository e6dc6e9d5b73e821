"""Frozen records: copying with changes."""

from __future__ import annotations

import dataclasses

import pytest

from worker.records import Machine
from worker.states import State


def _machine() -> Machine:
    return Machine(
        machine_type="orders",
        id="m-1",
        lookup_key="acct-1",
        state=State.PENDING,
        step=0,
        data={"amount": 5},
        fingerprint="a,b",
    )


def test_evolve_changes_only_the_given_fields_and_leaves_the_original_alone() -> None:
    before = _machine()
    after = before.evolve(state=State.OPEN, step=1, version=2)
    assert (after.state, after.step, after.version) == (State.OPEN, 1, 2)
    assert (before.state, before.step, before.version) == (State.PENDING, 0, 0)
    assert after == dataclasses.replace(before, state=State.OPEN, step=1, version=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        after.step = 3  # type: ignore[misc]


def test_evolve_refuses_a_name_that_is_not_a_field() -> None:
    with pytest.raises(TypeError, match=r"no field\(s\) \['stepp'\]"):
        _machine().evolve(stepp=1)
