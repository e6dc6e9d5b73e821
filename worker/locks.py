"""Business locks: global (GLOBAL_LOCK), local (the type's table) and type locks.

Acquisition is race-free across processes and hosts: every acquirer of a lookup key first
takes that key's LOOKUP_KEY_MUTEX row lock (SELECT ... FOR UPDATE semantics via an upsert),
so the check and the claim happen under one exclusive lock. Times come from the database.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, Table, and_, bindparam, delete, insert, or_, select, update
from sqlalchemy.dialects import mysql, sqlite
from sqlalchemy.sql.elements import ColumnElement

from worker import tables
from worker.definition import LockPolicy, MachineType, Registry
from worker.errors import TypeRejectedError, WorkerError
from worker.records import Machine, naive, utc
from worker.states import State


class TypeLockKind(StrEnum):
    REJECT = "reject"
    """Immediate Rejection: new machines of the type are refused."""
    SLEEP = "sleep"
    """Sleep State: new machines of the type wait until the lock lifts."""


@dataclass(frozen=True)
class HeldLock:
    scope: str
    lookup_key: str
    machine_type: str
    machine_id: str
    since: datetime | None


@dataclass(frozen=True)
class TypeLock:
    machine_type: str
    kind: TypeLockKind
    since: datetime | None
    until: datetime | None
    actor: str | None
    reason: str | None


def _active(column: Any) -> ColumnElement[bool]:
    """A lock column that is NULL or in the future means the lock is held."""
    return or_(column.is_(None), column > tables.utc_now())


def _scope_tables(registry: Registry, policy: LockPolicy, own: MachineType) -> list[Table]:
    """The tables whose older machines on the key go first: every type whose locks conflict.

    A local lock conflicts with its own type and with every type that takes global locks, so
    a newer local machine queues behind an older waiting global one instead of overtaking it.
    """
    return [
        tables.machine_table(t.name)
        for t in registry.values()
        if t.lock_policy is not LockPolicy.NONE
        and (policy.uses_global or t.lock_policy.uses_global or t.name == own.name)
    ]


def _local_tables(registry: Registry) -> list[Table]:
    return [tables.machine_table(t.name) for t in registry.values() if t.lock_policy.uses_local]


def _take_key_mutex(conn: Connection, lookup_key: str) -> None:
    mutex = tables.lookup_key_mutex
    if conn.dialect.name == "sqlite":
        conn.execute(sqlite.insert(mutex).values(LookupKey=lookup_key).on_conflict_do_nothing())
        return
    conn.execute(
        mysql.insert(mutex)
        .values(LookupKey=lookup_key)
        .on_duplicate_key_update(LookupKey=mutex.c.LookupKey)
    )


_ACTIVE_TYPE_LOCK = select(tables.type_lock).where(
    tables.type_lock.c.StateMachineType == bindparam("type_name"),
    _active(tables.type_lock.c.UnlockTimestamp),
)
"""Built once: every new machine and every start runs it, and building it costs more CPU
than the query."""


def active_type_lock(conn: Connection, type_name: str) -> TypeLock | None:
    row = conn.execute(_ACTIVE_TYPE_LOCK, {"type_name": type_name}).first()
    if row is None:
        return None
    return TypeLock(
        machine_type=row.StateMachineType,
        kind=TypeLockKind(row.LockKind),
        since=utc(row.LockTimestamp),
        until=utc(row.UnlockTimestamp),
        actor=row.Actor,
        reason=row.Reason,
    )


def check_type_not_rejected(conn: Connection, type_name: str) -> None:
    lock = active_type_lock(conn, type_name)
    if lock is not None and lock.kind is TypeLockKind.REJECT:
        raise TypeRejectedError(type_name, lock.reason)


def type_lock_blocker(
    conn: Connection, definition: MachineType
) -> tuple[str | None, datetime | None]:
    """A sleep lock on the type stops its machines from starting, until it lifts if known."""
    type_lock = active_type_lock(conn, definition.name)
    if type_lock is not None and type_lock.kind is TypeLockKind.SLEEP:
        return f"type {definition.name} is under a sleep lock", type_lock.until
    return None, None


def blocker(
    conn: Connection, registry: Registry, machine: Machine, definition: MachineType
) -> tuple[str | None, datetime | None]:
    """Why the machine cannot start now (None if it can), and when that lifts if known.

    On success the locks are taken: the GLOBAL_LOCK row is inserted here; the local lock is
    the machine row's UsesLocalLock flag, written by the caller in the same transaction.
    """
    asleep = type_lock_blocker(conn, definition)
    policy = definition.lock_policy
    if asleep[0] is not None or policy is LockPolicy.NONE:
        return asleep
    key = machine.lookup_key
    _take_key_mutex(conn, key)
    g = tables.global_lock
    holder = conn.execute(
        select(g.c.StateMachineType, g.c.StateMachineID)
        .where(g.c.LookupKey == key, _active(g.c.UnlockTimestamp))
        .limit(1)
    ).first()
    if holder is not None:
        return f"global lock on {key} held by {holder[0]}/{holder[1]}", None
    local_scope = _local_tables(registry) if policy.uses_global else []
    if policy.uses_local:
        own = tables.machine_table(definition.name)
        local_scope = [own, *[t for t in local_scope if t is not own]]
    for table in local_scope:
        held = conn.execute(
            select(table.c.ID)
            .where(
                table.c.LookupKey == key,
                table.c.UsesLocalLock.is_(True),
                _active(table.c.UnlockedTimestamp),
                table.c.ID != machine.id,
            )
            .limit(1)
        ).first()
        if held is not None:
            return f"local lock on {key} held by {table.c.Name.table.name}/{held[0]}", None
    for table in _scope_tables(registry, policy, definition):
        earlier = conn.execute(
            select(table.c.ID)
            .where(
                table.c.LookupKey == key,
                table.c.CurrentState.in_([State.PENDING.value, State.WAITING.value]),
                table.c.ID != machine.id,
                or_(
                    table.c.CreatedTimestamp < naive(machine.created_at),
                    and_(
                        table.c.CreatedTimestamp == naive(machine.created_at),
                        machine.id > table.c.ID,
                    ),
                ),
            )
            .limit(1)
        ).first()
        if earlier is not None:
            return f"queued behind older machine {earlier[0]} on {key}", None
    if policy.uses_global:
        conn.execute(
            insert(g).values(
                StateMachineType=definition.name,
                StateMachineID=machine.id,
                LookupKey=key,
                LockTimestamp=tables.utc_now(),
                UnlockTimestamp=None,
            )
        )
    return None, None


def release(conn: Connection, registry: Registry, machine: Machine) -> None:
    """Release the machine's locks (its own row is updated by the caller) and wake the next."""
    if machine.uses_global_lock:
        g = tables.global_lock
        conn.execute(
            update(g)
            .where(
                g.c.StateMachineType == machine.machine_type,
                g.c.StateMachineID == machine.id,
                g.c.UnlockTimestamp.is_(None),
            )
            .values(UnlockTimestamp=tables.utc_now())
        )
    wake_waiters(conn, registry, machine.lookup_key)


def wake_waiters(conn: Connection, registry: Registry, lookup_key: str) -> None:
    """Make the oldest waiting machine of each lock-using type on this key due now.

    Takes the key's mutex first, so that a machine whose lock check is in flight either sees
    the release or has committed its wait (and is woken here); no wake-up is lost.
    """
    _take_key_mutex(conn, lookup_key)
    for definition in registry.values():
        if definition.lock_policy is LockPolicy.NONE:
            continue
        table = tables.machine_table(definition.name)
        oldest = conn.execute(
            select(table.c.ID)
            .where(table.c.LookupKey == lookup_key, table.c.CurrentState == State.WAITING.value)
            .order_by(table.c.CreatedTimestamp, table.c.ID)
            .limit(1)
        ).first()
        if oldest is not None:
            conn.execute(
                update(table)
                .where(table.c.ID == oldest[0], table.c.CurrentState == State.WAITING.value)
                .values(NextRunTimestamp=tables.utc_now())
            )


def held_locks(conn: Connection, registry: Registry) -> list[HeldLock]:
    """Every global and local lock held now."""
    g = tables.global_lock
    found = [
        HeldLock("global", r.LookupKey, r.StateMachineType, r.StateMachineID, utc(r.LockTimestamp))
        for r in conn.execute(select(g).where(_active(g.c.UnlockTimestamp)).order_by(g.c.ID))
    ]
    for table in _local_tables(registry):
        rows = conn.execute(
            select(table.c.ID, table.c.Name, table.c.LookupKey, table.c.UpdatedTimestamp).where(
                table.c.UsesLocalLock.is_(True), _active(table.c.UnlockedTimestamp)
            )
        )
        found.extend(HeldLock("local", r.LookupKey, r.Name, r.ID, None) for r in rows)
    return found


def force_release(
    conn: Connection, registry: Registry, lookup_key: str, actor: str, reason: str
) -> int:
    """Release every lock on a key by force, with an audit entry; returns how many."""
    g = tables.global_lock
    released = conn.execute(
        update(g)
        .where(g.c.LookupKey == lookup_key, _active(g.c.UnlockTimestamp))
        .values(UnlockTimestamp=tables.utc_now())
    ).rowcount
    for table in _local_tables(registry):
        released += conn.execute(
            update(table)
            .where(
                table.c.LookupKey == lookup_key,
                table.c.UsesLocalLock.is_(True),
                _active(table.c.UnlockedTimestamp),
            )
            .values(UnlockedTimestamp=tables.utc_now())
        ).rowcount
    audit(conn, "lock.release", f"lookup_key={lookup_key}", actor, reason)
    wake_waiters(conn, registry, lookup_key)
    return int(released)


def audit(conn: Connection, action: str, target: str, actor: str, reason: str) -> None:
    if not actor.strip() or not reason.strip():
        raise WorkerError("operator actions need a non-empty actor and reason for the audit log")
    conn.execute(
        insert(tables.operator_audit).values(
            Action=action,
            Target=target[:400],
            Actor=actor,
            Reason=reason,
            OccurredTimestamp=tables.utc_now(),
        )
    )


def set_type_lock(
    conn: Connection,
    type_name: str,
    kind: TypeLockKind,
    *,
    until: datetime | None,
    actor: str,
    reason: str,
) -> None:
    t = tables.type_lock
    conn.execute(delete(t).where(t.c.StateMachineType == type_name))
    conn.execute(
        insert(t).values(
            StateMachineType=type_name,
            LockKind=kind.value,
            LockTimestamp=tables.utc_now(),
            UnlockTimestamp=None if until is None else until.replace(tzinfo=None),
            Actor=actor,
            Reason=reason,
        )
    )
    audit(conn, f"type_lock.set.{kind.value}", f"machine_type={type_name}", actor, reason)


def clear_type_lock(
    conn: Connection, registry: Registry, type_name: str, *, actor: str, reason: str
) -> bool:
    """Lift a type lock; machines that slept on it become due at once."""
    t = tables.type_lock
    removed = conn.execute(delete(t).where(t.c.StateMachineType == type_name)).rowcount
    audit(conn, "type_lock.clear", f"machine_type={type_name}", actor, reason)
    table = tables.machine_table(registry.get_type(type_name).name)
    conn.execute(
        update(table)
        .where(table.c.CurrentState == State.WAITING.value)
        .values(NextRunTimestamp=tables.utc_now())
    )
    return bool(removed)


def list_type_locks(conn: Connection) -> list[TypeLock]:
    t = tables.type_lock
    return [
        TypeLock(
            machine_type=r.StateMachineType,
            kind=TypeLockKind(r.LockKind),
            since=utc(r.LockTimestamp),
            until=utc(r.UnlockTimestamp),
            actor=r.Actor,
            reason=r.Reason,
        )
        for r in conn.execute(select(t).where(_active(t.c.UnlockTimestamp)))
    ]
