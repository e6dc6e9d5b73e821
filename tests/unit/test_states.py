"""The transition table, checked exhaustively over every (state, event, target) triple."""

from __future__ import annotations

import itertools

import pytest

from worker.errors import InvalidTransitionError
from worker.states import (
    OVERRIDE_TARGETS,
    TERMINAL,
    TRANSITIONS,
    Event,
    State,
    allowed_targets,
    check_transition,
)

ALL_TRIPLES = list(itertools.product(State, Event, State))


def test_check_transition_agrees_with_the_table_for_every_triple() -> None:
    """check_transition passes exactly the triples the table lists and raises for the rest."""
    allowed = 0
    for state, event, target in ALL_TRIPLES:
        if target in TRANSITIONS[event].get(state, frozenset()):
            check_transition(state, event, target)
            allowed += 1
        else:
            with pytest.raises(InvalidTransitionError) as info:
                check_transition(state, event, target)
            assert (info.value.state, info.value.event, info.value.target) == (
                state.value,
                event.value,
                target.value,
            )
    assert allowed == sum(len(t) for by_state in TRANSITIONS.values() for t in by_state.values())


def test_invalid_transition_message_names_state_event_and_target() -> None:
    with pytest.raises(InvalidTransitionError) as info:
        check_transition(State.COMPLETED, Event.STEP_SUCCEEDED, State.OPEN)
    assert str(info.value) == (
        "invalid transition: event 'step_succeeded' cannot move a machine from 'completed' "
        "to 'open'"
    )


def test_terminal_states_only_record_ignored_requests() -> None:
    """Nothing leaves a terminal state; a late command is recorded in place."""
    for state in TERMINAL:
        moves = {(e, t) for e in Event for t in allowed_targets(state, e)}
        assert moves == {(Event.REQUEST_IGNORED, state)}


def _successors(state: State) -> set[State]:
    return {t for e in Event for t in allowed_targets(state, e)} - {state}


def test_every_state_is_reachable_from_pending_and_every_live_state_can_finish() -> None:
    seen, frontier = {State.PENDING}, [State.PENDING]
    while frontier:
        for nxt in _successors(frontier.pop()):
            if nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    assert seen == set(State)
    for state in set(State) - TERMINAL:
        reach, todo = set(), [state]
        while todo:
            for nxt in _successors(todo.pop()):
                if nxt not in reach:
                    reach.add(nxt)
                    todo.append(nxt)
        assert reach & TERMINAL, f"{state} cannot reach a terminal state"


def test_override_reaches_only_operator_targets_and_only_from_stuck_states() -> None:
    sources = {s for s in State if allowed_targets(s, Event.OVERRIDDEN)}
    assert sources == {State.PARKED, State.ROLLBACK_FAILED}
    assert OVERRIDE_TARGETS == {
        State.OPEN,
        State.ROLLBACK,
        State.PAUSED,
        State.COMPLETED,
        State.FAILED,
        State.ROLLBACK_COMPLETED,
        State.CANCELLED,
    }
