"""States, transition events and the transition table, as data.

`check_transition` is the only gate: every decision the engine makes goes through it.
"""

from __future__ import annotations

from enum import StrEnum

from worker.errors import InvalidTransitionError


class State(StrEnum):
    PENDING = "pending"
    WAITING = "waiting"
    OPEN = "open"
    PAUSED = "paused"
    RETRY = "retry"
    ROLLBACK = "rollback"
    PARKED = "parked"
    ROLLBACK_FAILED = "rollback_failed"
    COMPLETED = "completed"
    FAILED = "failed"
    ROLLBACK_COMPLETED = "rollback_completed"
    CANCELLED = "cancelled"


class Event(StrEnum):
    CREATED = "created"
    LOCK_WAITING = "lock_waiting"
    STARTED = "started"
    STEP_SUCCEEDED = "step_succeeded"
    COMPLETED = "completed"
    STEP_FAILED = "step_failed"
    RETRY_SCHEDULED = "retry_scheduled"
    ROLLBACK_STARTED = "rollback_started"
    STEP_COMPENSATED = "step_compensated"
    COMPENSATION_FAILED = "compensation_failed"
    PAUSED = "paused"
    RESUMED = "resumed"
    CANCELLED = "cancelled"
    PARKED = "parked"
    RETRIED = "retried"
    OVERRIDDEN = "overridden"
    REQUEST_IGNORED = "request_ignored"


TERMINAL: frozenset[State] = frozenset(
    {State.COMPLETED, State.FAILED, State.ROLLBACK_COMPLETED, State.CANCELLED}
)
RUNNING: frozenset[State] = frozenset({State.OPEN, State.RETRY})
"""States in which a forward step is due."""

_ALL = frozenset(State)

TRANSITIONS: dict[Event, dict[State, frozenset[State]]] = {
    Event.CREATED: {State.PENDING: frozenset({State.PENDING})},
    Event.LOCK_WAITING: {
        State.PENDING: frozenset({State.WAITING}),
        State.WAITING: frozenset({State.WAITING}),
    },
    Event.STARTED: {
        State.PENDING: frozenset({State.OPEN}),
        State.WAITING: frozenset({State.OPEN}),
    },
    Event.STEP_SUCCEEDED: {s: frozenset({State.OPEN, State.COMPLETED}) for s in RUNNING},
    Event.COMPLETED: {s: frozenset({State.COMPLETED}) for s in RUNNING},
    Event.STEP_FAILED: {s: frozenset({State.FAILED}) for s in RUNNING},
    Event.RETRY_SCHEDULED: {
        State.OPEN: frozenset({State.RETRY}),
        State.RETRY: frozenset({State.RETRY}),
        State.ROLLBACK: frozenset({State.ROLLBACK}),
    },
    Event.ROLLBACK_STARTED: {
        s: frozenset({State.ROLLBACK, State.ROLLBACK_COMPLETED})
        for s in (State.OPEN, State.RETRY, State.PAUSED, State.PARKED)
    },
    Event.STEP_COMPENSATED: {State.ROLLBACK: frozenset({State.ROLLBACK, State.ROLLBACK_COMPLETED})},
    Event.COMPENSATION_FAILED: {State.ROLLBACK: frozenset({State.ROLLBACK_FAILED})},
    Event.PAUSED: {
        s: frozenset({State.PAUSED})
        for s in (State.PENDING, State.WAITING, State.OPEN, State.RETRY)
    },
    Event.RESUMED: {State.PAUSED: frozenset({State.OPEN, State.PENDING})},
    Event.CANCELLED: {
        s: frozenset({State.CANCELLED})
        for s in (State.PENDING, State.WAITING, State.OPEN, State.RETRY, State.PAUSED, State.PARKED)
    },
    Event.PARKED: {
        s: frozenset({State.PARKED})
        for s in (State.PENDING, State.WAITING, State.OPEN, State.RETRY, State.ROLLBACK)
    },
    Event.RETRIED: {
        State.RETRY: frozenset({State.RETRY}),
        State.PARKED: frozenset({State.OPEN, State.ROLLBACK}),
        State.ROLLBACK_FAILED: frozenset({State.ROLLBACK}),
    },
    Event.OVERRIDDEN: {
        s: frozenset(
            {
                State.OPEN,
                State.ROLLBACK,
                State.PAUSED,
                State.COMPLETED,
                State.FAILED,
                State.ROLLBACK_COMPLETED,
                State.CANCELLED,
            }
        )
        for s in (State.PARKED, State.ROLLBACK_FAILED)
    },
    Event.REQUEST_IGNORED: {s: frozenset({s}) for s in _ALL},
}

OVERRIDE_TARGETS: frozenset[State] = TRANSITIONS[Event.OVERRIDDEN][State.PARKED]
RUNNABLE: frozenset[State] = frozenset(
    {State.PENDING, State.WAITING, State.OPEN, State.RETRY, State.ROLLBACK}
)
"""States an executor picks up when their NextRunTimestamp is due."""


def allowed_targets(state: State, event: Event) -> frozenset[State]:
    return TRANSITIONS[event].get(state, frozenset())


def check_transition(state: State, event: Event, target: State) -> None:
    """Raise InvalidTransitionError unless the table allows `state --event--> target`."""
    if target not in allowed_targets(state, event):
        raise InvalidTransitionError(state.value, event.value, target.value)
