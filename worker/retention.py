"""Retention: delete finished machines and the bookkeeping rows nobody needs any more.

What goes, once it is older than the cutoff (the database clock minus the age):

- terminal machines (completed, failed, rollback_completed, cancelled), by UpdatedTimestamp,
  with their history rows;
- published outbox rows, by CreatedTimestamp;
- processed-command (inbox) rows, by ReceivedTimestamp;
- released GLOBAL_LOCK rows, by UnlockTimestamp.

Live machines, unpublished events, held locks and the operator audit log are never touched.
Deletion runs in batches, each its own short transaction, so it never holds locks for long.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from sqlalchemy import Connection, Table, delete, func, select
from sqlalchemy.sql.elements import ColumnElement

from worker import tables
from worker.errors import WorkerError
from worker.records import naive
from worker.states import TERMINAL
from worker.store import Store

DEFAULT_BATCH_SIZE = 500
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"(?:(\d+)([smhdw]))+")
_PART = re.compile(r"(\d+)([smhdw])")
_TERMINAL_VALUES = sorted(s.value for s in TERMINAL)


def parse_duration(text: str) -> timedelta:
    """`7d`, `12h`, `30m`, `45s`, `2w`, or a sum such as `1d12h`; `0s` means now."""
    compact = text.strip().lower()
    if not _DURATION.fullmatch(compact):
        raise WorkerError(
            f"duration {text[:32]!r} is not understood; expected a number and a unit "
            "(s, m, h, d, w), e.g. 7d, 12h, 30m or 1d12h"
        )
    seconds = sum(int(n) * _UNITS[unit] for n, unit in _PART.findall(compact))
    return timedelta(seconds=seconds)


@dataclass(frozen=True)
class PruneCounts:
    """Rows that were (or, in a dry run, would be) deleted."""

    machines: int = 0
    history: int = 0
    outbox: int = 0
    commands: int = 0
    global_locks: int = 0

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    def __add__(self, other: PruneCounts) -> PruneCounts:
        return PruneCounts(
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        )

    def summary(self) -> str:
        return (
            f"{self.machines} finished machines, {self.history} history rows, "
            f"{self.outbox} published events, {self.commands} processed commands, "
            f"{self.global_locks} released global locks"
        )


def cutoff_for(store: Store, age: timedelta) -> datetime:
    """The database's clock now, minus `age`."""
    return store.db_now() - age


def _finished(table: Table, cutoff: datetime) -> ColumnElement[bool]:
    return table.c.CurrentState.in_(_TERMINAL_VALUES) & (table.c.UpdatedTimestamp < naive(cutoff))


def _published(cutoff: datetime) -> ColumnElement[bool]:
    o = tables.outbox
    return o.c.PublishedTimestamp.is_not(None) & (o.c.CreatedTimestamp < naive(cutoff))


def _old_commands(cutoff: datetime) -> ColumnElement[bool]:
    return tables.processed_command.c.ReceivedTimestamp < naive(cutoff)


def _released_locks(cutoff: datetime) -> ColumnElement[bool]:
    g = tables.global_lock
    return g.c.UnlockTimestamp.is_not(None) & (g.c.UnlockTimestamp < naive(cutoff))


def _count(conn: Connection, table: Table, where: ColumnElement[bool]) -> int:
    return int(conn.execute(select(func.count()).select_from(table).where(where)).scalar_one())


def count(store: Store, cutoff: datetime) -> PruneCounts:
    """What `prune` would delete at this cutoff (the dry run)."""
    h = tables.history

    def work(conn: Connection) -> PruneCounts:
        machines = history = 0
        for name in sorted(store.registry):
            table = tables.machine_table(name)
            finished = _finished(table, cutoff)
            machines += _count(conn, table, finished)
            history += _count(
                conn,
                h,
                (h.c.StateMachineType == name)
                & h.c.StateMachineID.in_(select(table.c.ID).where(finished)),
            )
        return PruneCounts(
            machines=machines,
            history=history,
            outbox=_count(conn, tables.outbox, _published(cutoff)),
            commands=_count(conn, tables.processed_command, _old_commands(cutoff)),
            global_locks=_count(conn, tables.global_lock, _released_locks(cutoff)),
        )

    return store.run(work)


Progress = Callable[[int], Any]


def prune(
    store: Store,
    cutoff: datetime,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
) -> PruneCounts:
    """Delete everything `count` reports, in batches; `progress(rows)` is called per batch."""
    if batch_size < 1:
        raise WorkerError(f"batch size must be at least 1, found {batch_size}")
    report: Progress = progress or (lambda rows: None)
    total = PruneCounts()
    for name in sorted(store.registry):
        while True:
            done = store.run(
                partial(_machine_batch, type_name=name, cutoff=cutoff, limit=batch_size)
            )
            total += done
            report(done.total)
            if done.machines < batch_size:
                break
    simple: Sequence[tuple[str, Table, Any, ColumnElement[bool]]] = (
        ("outbox", tables.outbox, tables.outbox.c.ID, _published(cutoff)),
        (
            "commands",
            tables.processed_command,
            tables.processed_command.c.CommandID,
            _old_commands(cutoff),
        ),
        ("global_locks", tables.global_lock, tables.global_lock.c.ID, _released_locks(cutoff)),
    )
    for field_name, table, key, where in simple:
        while True:
            deleted = store.run(
                partial(_key_batch, table=table, key=key, where=where, limit=batch_size)
            )
            total += PruneCounts(**{field_name: deleted})
            report(deleted)
            if deleted < batch_size:
                break
    return total


def _machine_batch(conn: Connection, type_name: str, cutoff: datetime, limit: int) -> PruneCounts:
    table = tables.machine_table(type_name)
    finished = _finished(table, cutoff)
    ids = list(
        conn.execute(
            select(table.c.ID).where(finished).order_by(table.c.ID).limit(limit).with_for_update()
        ).scalars()
    )
    if not ids:
        return PruneCounts()
    h = tables.history
    history = conn.execute(
        delete(h).where(
            h.c.StateMachineType == type_name,
            h.c.StateMachineID.in_(ids),
        )
    ).rowcount
    machines = conn.execute(delete(table).where(table.c.ID.in_(ids), finished)).rowcount
    return PruneCounts(machines=int(machines), history=int(history))


def _key_batch(
    conn: Connection, table: Table, key: Any, where: ColumnElement[bool], limit: int
) -> int:
    keys = list(conn.execute(select(key).where(where).order_by(key).limit(limit)).scalars())
    if not keys:
        return 0
    return int(conn.execute(delete(table).where(key.in_(keys), where)).rowcount)
