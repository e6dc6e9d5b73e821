"""Operator actions the CLI wraps: send commands, inspect machines, release locks, type locks.

Each function is one library call over a `Store` (or, for publishing, Kafka settings), so
scripts and tests can do what `smw` does without a subprocess.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from worker import locks, tables
from worker.commands import apply_command
from worker.config import Settings
from worker.engine import Engine
from worker.errors import WorkerError
from worker.kafka_io import EventSink, KafkaEventSink, PublishError, make_producer
from worker.locks import HeldLock, TypeLock, TypeLockKind
from worker.messages import Command, CommandName, decode_command
from worker.records import HistoryEntry, Machine
from worker.states import State
from worker.store import Store

PUBLISH_TIMEOUT_SECONDS = 15.0


# -- commands ---------------------------------------------------------------------------


def build_command(
    store: Store,
    command: CommandName | str,
    machine_type: str,
    *,
    machine_id: str | None = None,
    lookup_key: str | None = None,
    data: dict[str, Any] | None = None,
    command_id: str | None = None,
    actor: str | None = None,
    reason: str | None = None,
    target_state: str | None = None,
) -> Command:
    """A command checked as the worker would check it: known type, then the wire schema.

    A start without a machine id gets a fresh one here, so the sender knows it up front.
    """
    name = CommandName(command)
    store.registry.get_type(machine_type)
    if name is CommandName.START and machine_id is None:
        machine_id = str(uuid.uuid4())
    built = Command(
        command_id=command_id or str(uuid.uuid4()),
        command=name,
        machine_type=machine_type,
        machine_id=machine_id,
        lookup_key=lookup_key,
        data=data,
        actor=actor,
        reason=reason,
        target_state=target_state,
    )
    return decode_command(built.to_json())


def apply_in_process(
    store: Store,
    command: Command,
    *,
    worker_id: str = "cli",
    wait_for_timers: bool = False,
) -> Machine:
    """The embedded default's command bus: record the command, run until idle, reload."""
    machine = apply_command(store, command)
    Engine(store, worker_id=worker_id).run_until_idle(wait_for_timers=wait_for_timers)
    return store.load(command.machine_type, machine.id)


def message_key(store: Store, command: Command, given: str | None = None) -> str:
    """The Kafka key for a command: its lookup key, read from the store if not given."""
    if given:
        return given
    if command.lookup_key:
        return command.lookup_key
    if command.machine_id is None:  # pragma: no cover  # decode_command requires it
        raise WorkerError(f"{command.command} needs a machine id")
    return store.load(command.machine_type, command.machine_id).lookup_key


def publish_command(
    settings: Settings, command: Command, key: str, *, sink: EventSink | None = None
) -> None:
    """Publish one command to the command topic and wait until the broker acknowledges it."""
    if sink is None:
        bounded = {"message.timeout.ms": str(int(PUBLISH_TIMEOUT_SECONDS * 1000))}
        config = settings.evolve(kafka_config={**bounded, **settings.kafka_config})
        sink = KafkaEventSink(make_producer(config))
    sink.publish(settings.command_topic, key.encode("utf-8"), command.to_json())
    try:
        sink.flush(PUBLISH_TIMEOUT_SECONDS)
    except PublishError as exc:
        first = exc.failures[0]
        raise WorkerError(
            f"the command was not acknowledged by topic {settings.command_topic!r} at "
            f"{settings.kafka_bootstrap} within {PUBLISH_TIMEOUT_SECONDS:.0f}s "
            f"({first.code}: {first.reason}); check SMW_KAFKA_BOOTSTRAP and the broker, "
            "then send it again with the same --command-id (a repeat is applied once)"
        ) from exc


# -- machines ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MachineView:
    """A machine with its history and whether its business locks are held now."""

    machine: Machine
    history: tuple[HistoryEntry, ...]
    local_lock_held: bool
    global_lock_held: bool
    step_names: tuple[str, ...]


def list_machines(
    store: Store,
    *,
    machine_type: str | None = None,
    state: str | None = None,
    lookup_key: str | None = None,
    limit: int = 100,
    after_id: str | None = None,
) -> list[Machine]:
    """Machines ordered by id, of one type or of all; page on with the last id as `after_id`."""
    if state is not None:
        State(state)
    names = [store.registry.get_type(machine_type).name] if machine_type else sorted(store.registry)
    found: list[Machine] = []
    for name in names:
        found.extend(
            store.list_machines(
                name, state=state, lookup_key=lookup_key, limit=limit, after_id=after_id
            )
        )
    found.sort(key=lambda m: (m.id, m.machine_type))
    return found[:limit]


def show_machine(store: Store, machine_type: str, machine_id: str) -> MachineView:
    definition = store.registry.get_type(machine_type)
    machine = store.load(definition.name, machine_id)
    history = store.history(definition.name, machine_id)
    now = store.db_now()
    local_held = machine.uses_local_lock and (
        machine.unlocked_at is None or machine.unlocked_at > now
    )
    g = tables.global_lock

    def global_held(conn: Any) -> bool:
        row = conn.execute(
            select(g.c.ID)
            .where(
                g.c.StateMachineType == definition.name,
                g.c.StateMachineID == machine_id,
                g.c.UnlockTimestamp.is_(None) | (g.c.UnlockTimestamp > tables.utc_now()),
            )
            .limit(1)
        ).first()
        return row is not None

    return MachineView(
        machine=machine,
        history=history,
        local_lock_held=local_held,
        global_lock_held=store.run(global_held),
        step_names=definition.step_names,
    )


# -- locks ------------------------------------------------------------------------------


def list_locks(store: Store) -> list[HeldLock]:
    """Every held global and local lock, global first."""
    return store.run(lambda conn: locks.held_locks(conn, store.registry))


def release_locks(store: Store, lookup_key: str, *, actor: str, reason: str) -> int:
    """Force-release every lock on a lookup key, with an audit entry; returns how many."""
    return store.run(
        lambda conn: locks.force_release(conn, store.registry, lookup_key, actor, reason)
    )


def parse_until(text: str | None) -> datetime | None:
    """An ISO 8601 time as aware UTC; a time without a zone is taken as UTC."""
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise WorkerError(
            f"--until {text[:64]!r} is not an ISO 8601 time; expected e.g. 2030-01-31T18:00:00Z"
        ) from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def set_type_lock(
    store: Store,
    machine_type: str,
    kind: TypeLockKind | str,
    *,
    until: datetime | None,
    actor: str,
    reason: str,
) -> TypeLock:
    """Put a type under an Immediate Rejection or Sleep State lock (replacing any other)."""
    name = store.registry.get_type(machine_type).name
    lock_kind = TypeLockKind(kind)
    if until is not None and until <= store.db_now():
        raise WorkerError(
            f"--until {until.isoformat()} is already past on the database clock; "
            "give a future time, or none for a lock that lasts until cleared"
        )

    def work(conn: Any) -> TypeLock:
        locks.set_type_lock(conn, name, lock_kind, until=until, actor=actor, reason=reason)
        held = locks.active_type_lock(conn, name)
        if held is None:  # pragma: no cover  # just written in this transaction
            raise WorkerError(f"the type lock on {name} did not take")
        return held

    return store.run(work)


def clear_type_lock(store: Store, machine_type: str, *, actor: str, reason: str) -> bool:
    """Lift a type lock; True if there was one. Sleeping machines become due at once."""
    name = store.registry.get_type(machine_type).name
    return store.run(
        lambda conn: locks.clear_type_lock(conn, store.registry, name, actor=actor, reason=reason)
    )


def list_type_locks(store: Store) -> list[TypeLock]:
    return store.run(locks.list_type_locks)


# -- rendering --------------------------------------------------------------------------


def iso(value: datetime | None) -> str:
    """RFC 3339 UTC with milliseconds, or '-'."""
    if value is None:
        return "-"
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def timeline(history: tuple[HistoryEntry, ...] | list[HistoryEntry]) -> list[str]:
    """The history as one readable line per transition, oldest first."""
    lines = [
        f"{'seq':>4}  {'time':<24}  {'event':<19} {'from → to':<30} {'step':<24} details",
    ]
    for entry in history:
        step = "" if entry.to_step is None else str(entry.to_step)
        if entry.from_step is not None and entry.from_step != entry.to_step:
            step = f"{entry.from_step}→{step}"
        if entry.handler:
            step = f"{step} {entry.handler}"
        lines.append(
            f"{entry.sequence:>4}  {iso(entry.occurred_at):<24}  {entry.event:<19} "
            f"{entry.from_state + ' → ' + entry.to_state:<30} {step:<24} "
            + "  ".join(details(entry))
        )
    return [line.rstrip() for line in lines]


def details(entry: HistoryEntry) -> list[str]:
    """Error, operator, reason, attempt and command of one transition, where present."""
    found = []
    if entry.error:
        found.append(f"error: {entry.error}")
    if entry.actor:
        found.append(f"by {entry.actor}")
    if entry.reason:
        found.append(f"reason: {entry.reason}")
    if entry.attempt > 1:
        found.append(f"attempt {entry.attempt}")
    if entry.command_id:
        found.append(f"command {entry.command_id}")
    return found
