"""Pure transition rules: (machine, what happened, now) -> Decision.

No I/O here. The engine runs handlers and hooks, asks these functions what that means, and
the store applies the resulting Decision in one transaction.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from worker.definition import Direction, MachineType, fingerprint_compatible
from worker.errors import CommandRejectedError
from worker.outcomes import (
    Cancel,
    Complete,
    Fail,
    Outcome,
    Park,
    Pause,
    Raised,
    Retry,
    Rollback,
    Success,
)
from worker.records import HistoryEntry, Machine, Request
from worker.retry import compute_backoff, retries_exhausted
from worker.states import TERMINAL, Event, State, allowed_targets, check_transition

REQUEST_EVENTS: dict[str, Event] = {
    "pause": Event.PAUSED,
    "resume": Event.RESUMED,
    "cancel": Event.CANCELLED,
    "rollback": Event.ROLLBACK_STARTED,
    "retry": Event.RETRIED,
    "override": Event.OVERRIDDEN,
}


@dataclass(frozen=True)
class Decision:
    """The machine after the transitions, the history rows they add, and what to do next."""

    machine: Machine
    history: tuple[HistoryEntry, ...] = ()
    release_locks: bool = False
    continue_now: bool = False


@dataclass(frozen=True)
class Happening:
    """What the engine observed, as input to a transition: who, how long, which command."""

    now: datetime
    worker_id: str | None = None
    duration_ms: float | None = None
    command_id: str | None = None
    actor: str | None = None
    reason: str | None = None


def transition(
    machine: Machine,
    event: Event,
    target: State,
    at: Happening,
    *,
    handler: str | None = None,
    error: str | None = None,
    changes: dict[str, Any] | None = None,
) -> tuple[Machine, HistoryEntry]:
    """Check the table, advance the sequence and build the history entry for one transition."""
    check_transition(machine.state, event, target)
    after = machine.evolve(
        state=target,
        sequence=machine.sequence + 1,
        updated_at=at.now,
        last_error=error if error is not None else machine.last_error,
        **(changes or {}),
    )
    if target in TERMINAL or target in (State.PAUSED, State.PARKED, State.ROLLBACK_FAILED):
        after = after.evolve(next_run_at=None)
    entry = HistoryEntry(
        machine_type=machine.machine_type,
        machine_id=machine.id,
        sequence=after.sequence,
        event_id=str(uuid.uuid4()),
        event=event.value,
        from_state=machine.state.value,
        to_state=target.value,
        from_step=machine.step,
        to_step=after.step,
        handler=handler,
        input_data=machine.data,
        output_data=after.data,
        error=error,
        attempt=machine.retry_count + 1,
        duration_ms=at.duration_ms,
        occurred_at=at.now,
        worker_id=at.worker_id,
        command_id=at.command_id,
        actor=at.actor,
        reason=at.reason,
    )
    return after, entry


def _decided(
    machine: Machine,
    entries: tuple[HistoryEntry, ...],
    definition: MachineType,
) -> Decision:
    runs_on = machine.state in (State.OPEN, State.ROLLBACK) and machine.next_run_at is not None
    return Decision(
        machine=machine,
        history=entries,
        release_locks=machine.state in TERMINAL,
        continue_now=runs_on and definition.execute_synchronously,
    )


def create(
    definition: MachineType,
    machine_id: str,
    lookup_key: str,
    data: dict[str, Any],
    at: Happening,
    *,
    state: State = State.PENDING,
    step: int = 0,
) -> Decision:
    """A new machine, due to run now, with its `created` history entry."""
    blank = Machine(
        machine_type=definition.name,
        id=machine_id,
        lookup_key=lookup_key,
        state=state,
        step=step,
        completed_steps=step,
        data=dict(data),
        fingerprint=definition.fingerprint,
        save_after_step=definition.save_after_each_step,
        event_topic=definition.event_topic,
        created_at=at.now,
        updated_at=at.now,
        next_run_at=at.now,
    )
    machine, entry = transition(blank, Event.CREATED, state, at)
    return Decision(machine=machine.evolve(next_run_at=at.now), history=(entry,))


def start(
    machine: Machine,
    definition: MachineType,
    at: Happening,
    *,
    blocked_by: str | None,
    recheck_at: datetime,
) -> Decision:
    """Locks were tried: open the machine holding them, or leave it waiting until `recheck_at`.

    Waiting writes one history entry when the machine starts to wait, not one per try.
    """
    if blocked_by is None:
        policy = definition.lock_policy
        opened, entry = transition(
            machine,
            Event.STARTED,
            State.OPEN,
            at,
            changes={
                "next_run_at": at.now,
                "uses_local_lock": policy.uses_local,
                "uses_global_lock": policy.uses_global,
                "unlocked_at": None,
            },
        )
        return Decision(
            machine=opened, history=(entry,), continue_now=definition.execute_synchronously
        )
    if machine.state is State.WAITING:
        return Decision(machine=machine.evolve(next_run_at=recheck_at))
    waiting, entry = transition(
        machine, Event.LOCK_WAITING, State.WAITING, at, changes={"next_run_at": recheck_at}
    )
    return Decision(machine=waiting, history=(entry.evolve(reason=blocked_by),))


def check_definition(machine: Machine, definition: MachineType, at: Happening) -> Decision | None:
    """Park a machine whose stored steps no longer match the code up to its position."""
    if fingerprint_compatible(machine.fingerprint, definition.fingerprint, machine.step):
        if machine.fingerprint != definition.fingerprint:
            return Decision(machine=machine.evolve(fingerprint=definition.fingerprint))
        return None
    reason = (
        f"definition changed incompatibly at step {machine.step}: stored steps "
        f"[{machine.fingerprint}], code has [{definition.fingerprint}]; fix the code or "
        "override the machine"
    )
    parked, entry = transition(machine, Event.PARKED, State.PARKED, at, error=reason)
    return Decision(machine=parked, history=(entry,))


def step_finished(
    machine: Machine, definition: MachineType, outcome: Outcome, at: Happening
) -> Decision:
    """The current step's action returned `outcome`: where does the machine go?"""
    if machine.direction is Direction.BACKWARD:
        return _compensation_finished(machine, definition, outcome, at)
    handler = definition.steps[machine.step].name
    last = len(definition.steps) - 1
    match outcome:
        case Success(data=changes):
            data = {**machine.data, **changes}
            done = machine.step + 1
            if machine.step >= last:
                after, entry = transition(
                    machine,
                    Event.STEP_SUCCEEDED,
                    State.COMPLETED,
                    at,
                    handler=handler,
                    changes={"data": data, "completed_steps": done, "retry_count": 0},
                )
            else:
                after, entry = transition(
                    machine,
                    Event.STEP_SUCCEEDED,
                    State.OPEN,
                    at,
                    handler=handler,
                    changes={
                        "data": data,
                        "completed_steps": done,
                        "step": done,
                        "retry_count": 0,
                        "next_run_at": at.now,
                    },
                )
        case Complete(data=changes):
            after, entry = transition(
                machine,
                Event.COMPLETED,
                State.COMPLETED,
                at,
                handler=handler,
                changes={"data": {**machine.data, **changes}, "completed_steps": machine.step + 1},
            )
        case Fail(error=error):
            after, entry = transition(
                machine, Event.STEP_FAILED, State.FAILED, at, handler=handler, error=error
            )
        case Retry() | Raised():
            return _retry_or_give_up(machine, definition, outcome, at, handler)
        case Rollback(reason=reason):
            return begin_rollback(machine, definition, at, handler=handler, reason=reason)
        case Pause(reason=reason):
            after, entry = transition(machine, Event.PAUSED, State.PAUSED, at, handler=handler)
            entry = entry.evolve(reason=reason)
        case Cancel(reason=reason):
            after, entry = transition(
                machine, Event.CANCELLED, State.CANCELLED, at, handler=handler
            )
            entry = entry.evolve(reason=reason)
        case Park(reason=reason):
            after, entry = transition(
                machine, Event.PARKED, State.PARKED, at, handler=handler, error=reason
            )
    return _decided(after, (entry,), definition)


def _retry_or_give_up(
    machine: Machine,
    definition: MachineType,
    outcome: Retry | Raised,
    at: Happening,
    handler: str,
) -> Decision:
    attempt = machine.retry_count + 1
    error = outcome.error
    if retries_exhausted(definition.retry, attempt):
        error = f"gave up after {attempt} attempts: {error}"
        if machine.direction is Direction.BACKWARD:
            after, entry = transition(
                machine,
                Event.COMPENSATION_FAILED,
                State.ROLLBACK_FAILED,
                at,
                handler=handler,
                error=error,
            )
        else:
            after, entry = transition(
                machine, Event.STEP_FAILED, State.FAILED, at, handler=handler, error=error
            )
        return _decided(after, (entry,), definition)
    delay = outcome.delay if isinstance(outcome, Retry) and outcome.delay is not None else None
    wait = compute_backoff(definition.retry, attempt) if delay is None else delay
    target = State.ROLLBACK if machine.direction is Direction.BACKWARD else State.RETRY
    after, entry = transition(
        machine,
        Event.RETRY_SCHEDULED,
        target,
        at,
        handler=handler,
        error=error,
        changes={
            "retry_count": attempt,
            "last_retry_at": at.now,
            "next_run_at": at.now + timedelta(seconds=wait),
        },
    )
    return Decision(machine=after, history=(entry,))


def begin_rollback(
    machine: Machine,
    definition: MachineType,
    at: Happening,
    *,
    handler: str | None = None,
    reason: str | None = None,
    event: Event = Event.ROLLBACK_STARTED,
) -> Decision:
    """Turn backward: compensate the completed steps newest first, or finish if there are none."""
    changes: dict[str, Any]
    if machine.completed_steps == 0:
        target, changes = State.ROLLBACK_COMPLETED, {"direction": Direction.BACKWARD}
    else:
        target = State.ROLLBACK
        changes = {
            "direction": Direction.BACKWARD,
            "step": machine.completed_steps - 1,
            "retry_count": 0,
            "next_run_at": at.now,
        }
    after, entry = transition(machine, event, target, at, handler=handler, changes=changes)
    return _decided(after, (entry.evolve(reason=reason or entry.reason),), definition)


def _compensation_finished(
    machine: Machine, definition: MachineType, outcome: Outcome, at: Happening
) -> Decision:
    handler = definition.steps[machine.step].name
    match outcome:
        case Success() | Complete() | Rollback():
            remaining = machine.step
            merged = {**machine.data, **getattr(outcome, "data", {})}
            if remaining == 0:
                changes: dict[str, Any] = {"completed_steps": 0, "data": merged}
                target = State.ROLLBACK_COMPLETED
            else:
                changes = {
                    "data": merged,
                    "completed_steps": remaining,
                    "step": remaining - 1,
                    "retry_count": 0,
                    "next_run_at": at.now,
                }
                target = State.ROLLBACK
            after, entry = transition(
                machine, Event.STEP_COMPENSATED, target, at, handler=handler, changes=changes
            )
        case Retry() | Raised():
            return _retry_or_give_up(machine, definition, outcome, at, handler)
        case Fail(error=error):
            after, entry = transition(
                machine,
                Event.COMPENSATION_FAILED,
                State.ROLLBACK_FAILED,
                at,
                handler=handler,
                error=error,
            )
        case Park(reason=reason):
            after, entry = transition(
                machine, Event.PARKED, State.PARKED, at, handler=handler, error=reason
            )
        case Pause() | Cancel():
            error = f"{type(outcome).__name__.lower()} is not allowed while compensating"
            after, entry = transition(
                machine, Event.PARKED, State.PARKED, at, handler=handler, error=error
            )
    return _decided(after, (entry,), definition)


def check_request(state: State, command: str, target_state: str | None = None) -> None:
    """Raise CommandRejectedError unless `command` may be applied to a machine in `state`."""
    event = REQUEST_EVENTS[command]
    allowed = allowed_targets(state, event)
    if command == "override" and target_state is not None:
        known = target_state in {s.value for s in State}
        allowed = allowed & {State(target_state)} if known else frozenset()
    if not allowed:
        raise CommandRejectedError(
            f"{command} is not allowed for a machine in state {state.value!r}",
            reason_code="invalid_for_state",
        )


def hook_for(machine: Machine, request: Request) -> str | None:
    """The step hook to run before applying `request`: pause or resume, if it applies."""
    if request.command in ("pause", "resume") and machine.step < len(
        machine.fingerprint.split(",")
    ):
        try:
            check_request(machine.state, request.command)
        except CommandRejectedError:
            return None
        return request.command
    return None


def apply_request(
    machine: Machine,
    definition: MachineType,
    request: Request,
    at: Happening,
    *,
    hook_error: str | None = None,
) -> Decision:
    """Apply a pending command between steps. One that no longer fits is recorded as ignored."""
    at = Happening(
        now=at.now,
        worker_id=at.worker_id,
        command_id=request.command_id,
        actor=request.actor,
        reason=request.reason,
    )
    cleared = machine.evolve(request=None)
    try:
        check_request(machine.state, request.command, request.target_state)
    except CommandRejectedError as exc:
        after, entry = transition(cleared, Event.REQUEST_IGNORED, machine.state, at, error=str(exc))
        return Decision(machine=after, history=(entry,), continue_now=False)
    handler = definition.steps[min(machine.step, len(definition.steps) - 1)].name
    match request.command:
        case "pause":
            after, entry = transition(
                cleared, Event.PAUSED, State.PAUSED, at, handler=handler, error=hook_error
            )
        case "resume":
            after, entry = transition(
                cleared,
                Event.RESUMED,
                State.OPEN if holds_locks(cleared, definition) else State.PENDING,
                at,
                handler=handler,
                error=hook_error,
                changes={"next_run_at": at.now},
            )
        case "cancel":
            after, entry = transition(cleared, Event.CANCELLED, State.CANCELLED, at)
        case "rollback":
            return begin_rollback(cleared, definition, at)
        case "retry":
            target = _retry_target(cleared)
            after, entry = transition(
                cleared,
                Event.RETRIED,
                target,
                at,
                changes={"next_run_at": at.now, "retry_count": 0},
            )
        case _:
            return _override(cleared, definition, State(request.target_state or ""), at)
    return _decided(after, (entry,), definition)


def holds_locks(machine: Machine, definition: MachineType) -> bool:
    """False for a machine paused before it took the locks its type needs."""
    policy = definition.lock_policy
    has_local = machine.uses_local_lock or not policy.uses_local
    has_global = machine.uses_global_lock or not policy.uses_global
    return has_local and has_global


def _retry_target(machine: Machine) -> State:
    if machine.state is State.RETRY:
        return State.RETRY
    return State.ROLLBACK if machine.direction is Direction.BACKWARD else State.OPEN


def _override(machine: Machine, definition: MachineType, target: State, at: Happening) -> Decision:
    if target is State.ROLLBACK:
        return begin_rollback(machine, definition, at, event=Event.OVERRIDDEN)
    changes: dict[str, Any] = {"retry_count": 0}
    if target is State.OPEN:
        changes.update(direction=Direction.FORWARD, next_run_at=at.now)
    after, entry = transition(machine, Event.OVERRIDDEN, target, at, changes=changes)
    return _decided(after, (entry,), definition)
