"""The store: every read and write of machines, history, outbox and commands, in SQLAlchemy Core.

One code path serves MySQL/MariaDB (mysqlclient) and SQLite (the embedded default). Each
public method is one transaction; decisions come in already made by `worker.decisions`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from functools import cache, lru_cache
from operator import attrgetter
from typing import Any, TypeVar

from sqlalchemy import (
    Connection,
    CursorResult,
    Dialect,
    Engine,
    Insert,
    Row,
    Select,
    Table,
    Update,
    and_,
    bindparam,
    create_engine,
    event,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.pool import StaticPool

from worker import decisions, locks, tables
from worker.decisions import Decision, Happening
from worker.definition import Direction, LockPolicy, MachineType, Registry
from worker.errors import (
    DuplicateCommandError,
    DuplicateMachineError,
    MachineNotFoundError,
    RequestPendingError,
    StaleWriteError,
    StoreUnavailableError,
)
from worker.records import (
    HistoryEntry,
    Machine,
    Request,
    dump_json,
    naive,
    transition_event,
    utc,
)
from worker.states import State

T = TypeVar("T")
DEADLOCK_RETRIES = 5
SCHEMA_ATTEMPTS = 5
_RETRYABLE_MYSQL_CODES = {1205, 1213}  # lock wait timeout, deadlock
DB_CLOCK_SECONDS = 5.0
"""How long `Store.db_time` advances one reading of the database clock before reading again."""
HELD_IDLE_PING_SECONDS = 1.0
"""A held connection idle longer than this goes back to the pool, which pings it on checkout."""


@dataclass(frozen=True)
class Inbox:
    """Where a command came from; recorded so that a redelivered command is applied once."""

    command_id: str
    command: str
    machine_type: str
    machine_id: str | None
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None


@dataclass
class DbClock:
    """The database's time, read once and advanced by this host's monotonic clock.

    Anchored when the read returns, so it runs at most one round trip behind the database,
    never ahead of it.
    """

    anchor: datetime
    started: float

    @classmethod
    def at(cls, db_now: datetime) -> DbClock:
        return cls(db_now, time.monotonic())

    def now(self) -> datetime:
        return self.anchor + timedelta(seconds=self.age())

    def age(self) -> float:
        return time.monotonic() - self.started


class _Held(threading.local):
    """The connection a thread holds inside `Store.holding_connection`."""

    def __init__(self) -> None:
        self.active = False
        self.conn: Connection | None = None
        self.last_used = 0.0


@dataclass(frozen=True)
class Claimed:
    """A machine this worker now leases, with the database time of the claim."""

    machine: Machine
    db_now: datetime
    start: Decision | None = None
    """The start the claim decided (types without locks): written already unless it runs on
    at once (`continue_now`), in which case the engine commits it with the first step."""


def make_engine(url: str, *, pool_size: int = 10) -> Engine:
    """An Engine configured for the worker: READ COMMITTED on MySQL, serialised writes on SQLite."""
    if url.startswith("sqlite"):
        memory = url in ("sqlite://", "sqlite:///:memory:")
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            poolclass=StaticPool if memory else None,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_connection: Any, record: Any) -> None:
            del record
            dbapi_connection.isolation_level = None
            if not memory:
                dbapi_connection.execute("PRAGMA journal_mode=WAL")
            dbapi_connection.execute("PRAGMA busy_timeout=30000")

        @event.listens_for(engine, "begin")
        def _sqlite_begin(connection: Connection) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(
        url,
        isolation_level="READ COMMITTED",
        pool_pre_ping=True,
        # Every connection is used in a `with` block that commits or rolls back before it is
        # closed, so the pool's extra ROLLBACK on return would be one more round trip per
        # transaction for nothing (SQLAlchemy sends it after a commit too).
        pool_reset_on_return=None,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_recycle=3600,
    )


_HISTORY_INSERT = insert(tables.history)
_OUTBOX_INSERT = insert(tables.outbox)
_INBOX_INSERT = insert(tables.processed_command).values(ReceivedTimestamp=tables.utc_now())


@cache
def _machine_insert(table: Table) -> Insert:
    """A new machine's INSERT, due now by the database clock; built once per table."""
    return insert(table).values(NextRunTimestamp=tables.utc_now())


@dataclass(frozen=True)
class _Compiled:
    """A Core statement compiled once for one dialect and one set of parameter names."""

    sql: str
    names: tuple[str, ...]
    processors: tuple[Callable[[Any], Any] | None, ...]

    def values(self, row: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(
            row[name] if process is None else process(row[name])
            for name, process in zip(self.names, self.processors, strict=True)
        )


@lru_cache(maxsize=512)
def _compiled(statement: Insert | Update, keys: tuple[str, ...], dialect: Dialect) -> _Compiled:
    compiled = statement.compile(dialect=dialect, column_keys=list(keys))
    names = tuple(compiled.positiontup or ())
    processors = tuple(
        compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect) for name in names
    )
    return _Compiled(compiled.string, names, processors)


def _execute_hot(
    conn: Connection, statement: Insert | Update, rows: list[dict[str, Any]]
) -> CursorResult[Any]:
    """Run a statement every step sends (machine UPDATE, history, outbox and inbox INSERTs).

    Core builds and compiles it once per set of parameter names; each call then sends its
    SQL through `exec_driver_sql`, which keeps the transaction, the events and the error
    translation but skips the per-call execution context, parameter processing and result
    metadata of `Connection.execute`: a third of the engine's CPU per step when profiled.
    Several rows go as one executemany.
    """
    prepared = _compiled(statement, tuple(rows[0]), conn.dialect)
    if len(rows) == 1:
        return conn.exec_driver_sql(prepared.sql, prepared.values(rows[0]))
    return conn.exec_driver_sql(prepared.sql, [prepared.values(row) for row in rows])


@cache
def _machine_update(table: Table, *, extends_lease: bool, unlocks: bool, guarded: bool) -> Update:
    """The fenced UPDATE that `Store._apply` runs, built once per table and shape.

    The changed columns arrive as parameters, and `_execute_hot` compiles one SET clause per
    set of parameter names, once. Building the UPDATE with `.values(...)` on every
    transition would cost more client CPU than its round trip.
    """
    statement = update(table).where(
        table.c.ID == bindparam("fence_id"), table.c.Version == bindparam("fence_version")
    )
    if guarded:
        statement = statement.where(table.c.PendingRequest.is_(None))
    computed: dict[str, Any] = {}
    if extends_lease:
        computed["LeaseExpiresTimestamp"] = tables.utc_now_plus(bindparam("lease_ms"))
    if unlocks:
        computed["UnlockedTimestamp"] = tables.utc_now()
    return statement.values(computed) if computed else statement


@cache
def _claim_select(table: Table, limit: int, *, by_id: bool) -> Select[Any]:
    """Due machines no live lease holds, oldest due first; built once per table and shape."""
    due = and_(
        table.c.NextRunTimestamp <= tables.utc_now(),
        or_(table.c.LeaseOwner.is_(None), table.c.LeaseExpiresTimestamp < tables.utc_now()),
    )
    query = select(table, tables.utc_now().label("db_now")).where(due)
    if by_id:
        query = query.where(table.c.ID == bindparam("machine_id"))
    return query.order_by(table.c.NextRunTimestamp).limit(limit).with_for_update(skip_locked=True)


@cache
def _claim_update(table: Table) -> Update:
    """Lease the claimed rows to a worker; built once per table."""
    return (
        update(table)
        .where(table.c.ID.in_(bindparam("ids", expanding=True)))
        .values(
            LeaseOwner=bindparam("owner"),
            LeaseExpiresTimestamp=tables.utc_now_plus(bindparam("lease_ms")),
            Version=table.c.Version + 1,
        )
    )


def _starts_in_claim(machine: Machine, definition: MachineType) -> bool:
    return (
        definition.lock_policy is LockPolicy.NONE
        and machine.request is None
        and machine.state in (State.PENDING, State.WAITING)
    )


def _start_decision(
    machine: Machine,
    definition: MachineType,
    at: Happening,
    blocker: tuple[str | None, datetime | None],
    recheck_seconds: float,
) -> Decision:
    """Open the machine, or leave it waiting until the blocker lifts or the recheck is due."""
    blocked_by, lifts_at = blocker
    recheck = at.now + timedelta(seconds=recheck_seconds)
    if lifts_at is not None:
        recheck = min(recheck, lifts_at)
    return decisions.start(machine, definition, at, blocked_by=blocked_by, recheck_at=recheck)


def _is_retryable(exc: DBAPIError) -> bool:
    args: tuple[Any, ...] = getattr(exc.orig, "args", ())
    return bool(args) and args[0] in _RETRYABLE_MYSQL_CODES


def machine_from_row(type_name: str, row: Row[Any]) -> Machine:
    state = json.loads(row.SerializedState)
    engine_fields = state.get("engine", {})
    return Machine(
        machine_type=type_name,
        id=row.ID,
        lookup_key=row.LookupKey,
        state=State(row.CurrentState),
        step=row.ResumeFromStep,
        data=state.get("data", {}),
        fingerprint=row.DefinitionFingerprint,
        version=row.Version,
        sequence=engine_fields.get("sequence", 0),
        direction=Direction(engine_fields.get("direction", "forward")),
        completed_steps=engine_fields.get("completed_steps", 0),
        retry_count=row.RetryCount,
        last_error=engine_fields.get("last_error"),
        save_after_step=bool(row.SaveAfterStep),
        event_topic=row.KafkaEventTopic,
        uses_global_lock=bool(row.UsesGlobalLock),
        uses_local_lock=bool(row.UsesLocalLock),
        unlocked_at=utc(row.UnlockedTimestamp),
        last_retry_at=utc(row.LastRetryTimestamp),
        next_run_at=utc(row.NextRunTimestamp),
        created_at=utc(row.CreatedTimestamp),
        updated_at=utc(row.UpdatedTimestamp),
        lease_owner=row.LeaseOwner,
        lease_expires_at=utc(row.LeaseExpiresTimestamp),
        request=Request.from_json(row.PendingRequest),
    )


_MACHINE_COLUMNS: tuple[tuple[str, Callable[[Machine], Any]], ...] = (
    ("Name", attrgetter("machine_type")),
    ("LookupKey", attrgetter("lookup_key")),
    ("CurrentState", lambda m: m.state.value),
    ("ResumeFromStep", attrgetter("step")),
    ("SaveAfterStep", attrgetter("save_after_step")),
    ("KafkaEventTopic", attrgetter("event_topic")),
    ("SerializedState", attrgetter("serialized_state")),
    ("CreatedTimestamp", lambda m: naive(m.created_at)),
    ("UpdatedTimestamp", lambda m: naive(m.updated_at)),
    ("UsesGlobalLock", attrgetter("uses_global_lock")),
    ("UsesLocalLock", attrgetter("uses_local_lock")),
    ("UnlockedTimestamp", lambda m: naive(m.unlocked_at)),
    ("LastRetryTimestamp", lambda m: naive(m.last_retry_at)),
    ("RetryCount", attrgetter("retry_count")),
    ("NextRunTimestamp", lambda m: naive(m.next_run_at)),
    ("DefinitionFingerprint", attrgetter("fingerprint")),
)
_ALWAYS_WRITTEN = frozenset({"SerializedState", "NextRunTimestamp"})
"""Written on every transition: the serialized state changes with each history entry, and
NextRunTimestamp is also set by other writers (wake-ups, commands) while a lease is held."""


def machine_values(machine: Machine) -> dict[str, Any]:
    """The row values a machine writes (lease and request columns are written separately)."""
    return {column: value(machine) for column, value in _MACHINE_COLUMNS}


def changed_machine_values(before: Machine, after: Machine) -> dict[str, Any]:
    """The columns `after` changes in the row `before` was read or written as.

    Fewer columns mean a shorter UPDATE to build, escape and send, and a column an operator
    changed meanwhile (a forced lock release) is not written back with an old value.
    """
    changed = {}
    for column, value in _MACHINE_COLUMNS:
        new = value(after)
        if column in _ALWAYS_WRITTEN or new != value(before):
            changed[column] = new
    return changed


def history_from_row(row: Row[Any]) -> HistoryEntry:
    return HistoryEntry(
        machine_type=row.StateMachineType,
        machine_id=row.StateMachineID,
        sequence=row.Sequence,
        event_id=row.EventID,
        event=row.Event,
        from_state=row.FromState,
        to_state=row.ToState,
        from_step=row.FromStep,
        to_step=row.ToStep,
        handler=row.Handler,
        input_data=json.loads(row.InputData) if row.InputData is not None else None,
        output_data=json.loads(row.OutputData) if row.OutputData is not None else None,
        error=row.Error,
        attempt=row.Attempt,
        duration_ms=row.DurationMs,
        occurred_at=utc(row.OccurredTimestamp) or row.OccurredTimestamp,
        worker_id=row.WorkerID,
        command_id=row.CommandID,
        actor=row.Actor,
        reason=row.Reason,
    )


def _history_values(entry: HistoryEntry) -> dict[str, Any]:
    return {
        "StateMachineType": entry.machine_type,
        "StateMachineID": entry.machine_id,
        "Sequence": entry.sequence,
        "EventID": entry.event_id,
        "Event": entry.event,
        "FromState": entry.from_state,
        "ToState": entry.to_state,
        "FromStep": entry.from_step,
        "ToStep": entry.to_step,
        "Handler": entry.handler,
        "InputData": None if entry.input_data is None else dump_json(entry.input_data),
        "OutputData": None if entry.output_data is None else dump_json(entry.output_data),
        "Error": entry.error,
        "Attempt": entry.attempt,
        "DurationMs": entry.duration_ms,
        "WorkerID": entry.worker_id,
        "CommandID": entry.command_id,
        "Actor": entry.actor,
        "Reason": entry.reason,
        "OccurredTimestamp": naive(entry.occurred_at),
    }


class Store:
    """Machines, their history, the outbox and the command inbox, behind one seam."""

    def __init__(
        self,
        engine: Engine | str,
        registry: Registry,
        *,
        default_topic: str = "statemachine.events",
    ) -> None:
        self.engine = make_engine(engine) if isinstance(engine, str) else engine
        self.registry = registry
        self.default_topic = default_topic
        self.dialect = self.engine.dialect.name
        self._held = _Held()
        self._clock: DbClock | None = None

    # -- plumbing -------------------------------------------------------------------------

    @contextmanager
    def holding_connection(self) -> Iterator[None]:
        """Run every transaction of this thread, inside the block, on one pooled connection.

        A machine's run is a claim, a start and a commit per step; checking a connection out
        of the pool for each would cost a pre-ping round trip each time. The held connection
        is pinged again only after it sat idle, and replaced after any database error.
        """
        if self._held.active:
            yield
            return
        self._held.active = True
        try:
            yield
        finally:
            self._held.active = False
            self._drop_held()

    def _drop_held(self) -> None:
        conn: Connection | None = self._held.conn
        self._held.conn = None
        if conn is not None:
            conn.close()

    def _held_connection(self) -> Connection:
        """The thread's held connection; one idle too long goes back to the pool first."""
        now = time.monotonic()
        if self._held.conn is not None and now - self._held.last_used > HELD_IDLE_PING_SECONDS:
            self._drop_held()  # the next checkout pings it
        if self._held.conn is None:
            self._held.conn = self.engine.connect()
        self._held.last_used = now
        return self._held.conn

    @contextmanager
    def _connect(self) -> Iterator[Connection]:
        try:
            if not self._held.active:
                with self.engine.connect() as conn:
                    yield conn
                return
            conn = self._held_connection()
            try:
                yield conn
            finally:
                if conn.in_transaction() and not conn.invalidated:
                    conn.rollback()  # a read outside `run` auto-began one
        except OperationalError as exc:
            self._drop_held()
            raise StoreUnavailableError(
                f"database unreachable or transaction failed: {type(exc.orig).__name__}: {exc.orig}"
            ) from exc
        except DBAPIError:
            self._drop_held()
            raise

    def run(self, work: Callable[[Connection], T]) -> T:
        """Run `work` in one transaction, retrying it on deadlock or lock-wait timeout.

        A held connection that the server dropped since its last use is replaced and the
        transaction tried once more; every write is fenced, so a repeat cannot apply twice.
        """
        reconnected = False
        for attempt in range(DEADLOCK_RETRIES):
            reused = self._held.active and self._held.conn is not None
            try:
                with self._connect() as conn, conn.begin():
                    return work(conn)
            except StoreUnavailableError as exc:
                cause = exc.__cause__
                if not isinstance(cause, DBAPIError) or attempt == DEADLOCK_RETRIES - 1:
                    raise
                if _is_retryable(cause):
                    continue
                if reused and cause.connection_invalidated and not reconnected:
                    reconnected = True
                    continue
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def table(self, type_name: str) -> Table:
        return tables.machine_table(self.registry.get_type(type_name).name)

    def topic_for(self, machine: Machine) -> str:
        return machine.event_topic or self.default_topic

    def ensure_schema(self) -> list[str]:
        """Create the shared tables and one table per registered type, if missing.

        Workers starting together race here: a table or the relay row that another process
        created between the check and the create is not an error, so the check runs again.
        """
        for name in self.registry:
            tables.machine_table(name)
        wanted = set(tables.shared_table_names()) | {
            tables.machine_table_name(n) for n in self.registry
        }
        create = [t for t in tables.metadata.sorted_tables if t.name in wanted]
        for attempt in range(SCHEMA_ATTEMPTS):
            try:
                with self._connect() as conn, conn.begin():
                    tables.metadata.create_all(conn, tables=create, checkfirst=True)
                    relay_rows = select(func.count()).select_from(tables.outbox_relay)
                    if conn.execute(relay_rows).scalar() == 0:
                        conn.execute(insert(tables.outbox_relay).values(Name="relay"))
                break
            except (StoreUnavailableError, IntegrityError):
                if attempt == SCHEMA_ATTEMPTS - 1:
                    raise
        return [t.name for t in create]

    def db_now(self) -> datetime:
        with self._connect() as conn:
            return _as_datetime(conn.execute(select(tables.utc_now())).scalar_one())

    def db_time(self) -> datetime:
        """The database's time without a query each call: a reading at most a few seconds
        old, advanced by the monotonic clock. For timestamps, not for lease decisions."""
        clock = self._clock
        if clock is None or clock.age() > DB_CLOCK_SECONDS:
            clock = self._clock = DbClock.at(self.db_now())
        return clock.now()

    # -- writes ---------------------------------------------------------------------------

    def _record_inbox(self, conn: Connection, inbox: Inbox, outcome: str) -> None:
        # No savepoint: a duplicate aborts the whole transaction anyway (the error leaves
        # `work` and `run` rolls back), and SAVEPOINT/RELEASE would cost two round trips.
        try:
            _execute_hot(
                conn,
                _INBOX_INSERT,
                [
                    {
                        "CommandID": inbox.command_id,
                        "Command": inbox.command,
                        "StateMachineType": inbox.machine_type,
                        "StateMachineID": inbox.machine_id,
                        "Outcome": outcome,
                        "KafkaTopic": inbox.topic,
                        "KafkaPartition": inbox.partition,
                        "KafkaOffset": inbox.offset,
                    }
                ],
            )
        except IntegrityError as exc:
            raise DuplicateCommandError(inbox.command_id) from exc

    def _write_history(
        self, conn: Connection, machine: Machine, entries: Sequence[HistoryEntry]
    ) -> None:
        if not entries:
            return
        _execute_hot(conn, _HISTORY_INSERT, [_history_values(e) for e in entries])
        topic = self.topic_for(machine)
        _execute_hot(
            conn,
            _OUTBOX_INSERT,
            [
                {
                    "EventID": e.event_id,
                    "Topic": topic,
                    "MessageKey": machine.id,
                    "Payload": dump_json(
                        transition_event(machine.evolve(data=e.output_data or {}), e)
                    ),
                    "CreatedTimestamp": naive(e.occurred_at),
                }
                for e in entries
            ],
        )

    def create_machine(self, decision: Decision, inbox: Inbox | None = None) -> Machine:
        """Insert a new machine with its first history entry (and the command that made it)."""
        machine = decision.machine
        table = self.table(machine.machine_type)

        def work(conn: Connection) -> Machine:
            if inbox is not None:
                self._record_inbox(conn, inbox, "applied")
            locks.check_type_not_rejected(conn, machine.machine_type)
            values = machine_values(machine)
            del values["NextRunTimestamp"]  # the database's time, set by the statement
            try:
                row = {"ID": machine.id, "Version": 1, **values}
                _execute_hot(conn, _machine_insert(table), [row])
            except IntegrityError as exc:
                raise DuplicateMachineError(machine.machine_type, machine.id) from exc
            self._write_history(conn, machine, decision.history)
            return machine.evolve(version=1)

        return self.run(work)

    def record_request(
        self, machine_type: str, machine_id: str, request: Request, inbox: Inbox | None = None
    ) -> Machine:
        """Store a command for the machine to apply when its current step ends."""
        table = self.table(machine_type)

        def work(conn: Connection) -> Machine:
            if inbox is not None:
                self._record_inbox(conn, inbox, "applied")
            row = conn.execute(
                select(table).where(table.c.ID == machine_id).with_for_update()
            ).first()
            if row is None:
                raise MachineNotFoundError(machine_type, machine_id)
            machine = machine_from_row(machine_type, row)
            if machine.request is not None:
                raise RequestPendingError(machine.request.command)
            decisions.check_request(machine.state, request.command, request.target_state)
            conn.execute(
                update(table)
                .where(table.c.ID == machine_id)
                .values(PendingRequest=request.to_json(), NextRunTimestamp=tables.utc_now())
            )
            return machine.evolve(request=request)

        return self.run(work)

    def claim(
        self,
        type_name: str,
        worker_id: str,
        lease_seconds: float,
        *,
        limit: int = 1,
        machine_id: str | None = None,
        recheck_seconds: float = 10.0,
    ) -> list[Claimed]:
        """Lease up to `limit` due machines of a type that no live lease holds.

        A new or waiting machine of a type without locks has no lock to take, only the type
        lock to check, so its start is decided here. If it runs its first step at once, the
        engine commits the start with that step; otherwise (it waits, or its type runs steps
        later) the start is written in this transaction.
        """
        table = self.table(type_name)
        definition = self.registry.get_type(type_name)
        lease_ms = int(lease_seconds * 1000)

        def work(conn: Connection) -> list[Claimed]:
            by_id = machine_id is not None
            query = _claim_select(table, limit, by_id=by_id)
            rows = conn.execute(query, {"machine_id": machine_id} if by_id else {}).all()
            if not rows:
                return []
            db_now = _as_datetime(rows[0].db_now)
            at = Happening(now=db_now, worker_id=worker_id)
            machines = [machine_from_row(type_name, r).evolve(lease_owner=worker_id) for r in rows]
            starting = {m.id for m in machines if _starts_in_claim(m, definition)}
            asleep = locks.type_lock_blocker(conn, definition) if starting else (None, None)
            runs_now = asleep[0] is None and definition.execute_synchronously
            written_now = [] if runs_now else [m for m in machines if m.id in starting]
            leased = [
                m.evolve(version=m.version + 1)
                for m in machines
                if runs_now or m.id not in starting
            ]
            claimed = []
            if leased:
                conn.execute(
                    _claim_update(table),
                    {"ids": [m.id for m in leased], "owner": worker_id, "lease_ms": lease_ms},
                )
            for machine in leased:
                start = None
                if machine.id in starting:
                    start = _start_decision(machine, definition, at, asleep, recheck_seconds)
                claimed.append(Claimed(machine, db_now, start=start))
            for machine in written_now:
                start = _start_decision(machine, definition, at, asleep, recheck_seconds)
                written = self._apply(conn, machine, start, lease_seconds)
                claimed.append(Claimed(written, db_now, start=start))
            return claimed

        return self.run(work)

    def commit(self, before: Machine, decision: Decision, *, lease_seconds: float) -> Machine:
        """Apply a decision made while holding the lease at `before.version`.

        Returns the machine as written. If a command arrived during the step, the returned
        machine carries it and keeps the lease, so the engine applies it next.
        """
        return self.run(lambda conn: self._apply(conn, before, decision, lease_seconds))

    def start(
        self,
        before: Machine,
        definition: MachineType,
        at: Happening,
        *,
        lease_seconds: float,
        recheck_seconds: float = 10.0,
    ) -> tuple[Machine, Decision]:
        """Take the type's locks and open the machine, or leave it waiting for them."""

        def work(conn: Connection) -> tuple[Machine, Decision]:
            blocker = locks.blocker(conn, self.registry, before, definition)
            # The transition happens now, under the key's mutex, not when the engine asked:
            # a `started` row must never predate the previous holder's release.
            locked_at = _as_datetime(conn.execute(select(tables.utc_now())).scalar_one())
            at_lock = replace(at, now=max(at.now, locked_at))
            decision = _start_decision(before, definition, at_lock, blocker, recheck_seconds)
            return self._apply(conn, before, decision, lease_seconds), decision

        return self.run(work)

    def _apply(
        self, conn: Connection, before: Machine, decision: Decision, lease_seconds: float
    ) -> Machine:
        table = self.table(before.machine_type)
        lease_ms = int(lease_seconds * 1000)
        machine = decision.machine
        values = changed_machine_values(before, machine)
        if not decision.continue_now:
            values.update(LeaseOwner=None, LeaseExpiresTimestamp=None)
        elif before.lease_owner is not None:
            values["LeaseOwner"] = before.lease_owner
        unlocks = decision.release_locks and (machine.uses_local_lock or machine.uses_global_lock)
        if unlocks:
            values.pop("UnlockedTimestamp", None)  # the database's time, set by the statement
        clears_request = before.request is not None and machine.request is None
        if clears_request:
            values["PendingRequest"] = None
        version = before.version + 1
        params = {
            **values,
            "Version": version,
            "fence_id": before.id,
            "fence_version": before.version,
        }
        if decision.continue_now:
            params["lease_ms"] = lease_ms
        statement = _machine_update(
            table, extends_lease=decision.continue_now, unlocks=unlocks, guarded=not clears_request
        )
        written = _execute_hot(conn, statement, [params])
        request = None
        if written.rowcount == 0:
            row = conn.execute(
                select(table.c.Version, table.c.PendingRequest)
                .where(table.c.ID == before.id)
                .with_for_update()
            ).first()
            if row is None or row.Version != before.version:
                raise StaleWriteError(before.machine_type, before.id, before.version)
            request = Request.from_json(row.PendingRequest)
            values.update(
                LeaseOwner=before.lease_owner,
                LeaseExpiresTimestamp=tables.utc_now_plus(literal(lease_ms)),
            )
            if unlocks:
                values["UnlockedTimestamp"] = tables.utc_now()
            fenced = and_(table.c.ID == before.id, table.c.Version == before.version)
            conn.execute(update(table).where(fenced).values(Version=version, **values))
        self._write_history(conn, machine, decision.history)
        if (
            decision.release_locks
            and self.registry.get_type(machine.machine_type).lock_policy is not LockPolicy.NONE
        ):
            locks.release(conn, self.registry, machine)
        keeps_lease = decision.continue_now or request is not None
        return machine.evolve(
            version=version,
            request=request,
            lease_owner=before.lease_owner if keeps_lease else None,
        )

    def renew_lease(self, machine: Machine, lease_seconds: float) -> bool:
        """Extend this worker's lease; False when the machine moved on without it."""
        table = self.table(machine.machine_type)

        def work(conn: Connection) -> bool:
            result = conn.execute(
                update(table)
                .where(
                    table.c.ID == machine.id,
                    table.c.Version == machine.version,
                    table.c.LeaseOwner == machine.lease_owner,
                )
                .values(
                    LeaseExpiresTimestamp=tables.utc_now_plus(literal(int(lease_seconds * 1000)))
                )
            )
            return bool(result.rowcount)

        return self.run(work)

    def release_lease(self, machine: Machine) -> None:
        """Hand a leased machine back so another worker can run it at once."""
        table = self.table(machine.machine_type)
        self.run(
            lambda conn: conn.execute(
                update(table)
                .where(table.c.ID == machine.id, table.c.Version == machine.version)
                .values(LeaseOwner=None, LeaseExpiresTimestamp=None)
            )
        )

    # -- reads ----------------------------------------------------------------------------

    def load(self, type_name: str, machine_id: str) -> Machine:
        table = self.table(type_name)
        with self._connect() as conn:
            row = conn.execute(select(table).where(table.c.ID == machine_id)).first()
        if row is None:
            raise MachineNotFoundError(type_name, machine_id)
        return machine_from_row(type_name, row)

    def history(self, type_name: str, machine_id: str) -> tuple[HistoryEntry, ...]:
        h = tables.history
        with self._connect() as conn:
            rows = conn.execute(
                select(h)
                .where(h.c.StateMachineType == type_name, h.c.StateMachineID == machine_id)
                .order_by(h.c.Sequence)
            ).all()
        return tuple(history_from_row(r) for r in rows)

    def list_machines(
        self,
        type_name: str,
        *,
        state: str | None = None,
        lookup_key: str | None = None,
        limit: int = 100,
        after_id: str | None = None,
    ) -> list[Machine]:
        """Machines of one type, filtered and paged by id (pass the last id as `after_id`)."""
        table = self.table(type_name)
        query = select(table).order_by(table.c.ID).limit(limit)
        if state is not None:
            query = query.where(table.c.CurrentState == state)
        if lookup_key is not None:
            query = query.where(table.c.LookupKey == lookup_key)
        if after_id is not None:
            query = query.where(after_id < table.c.ID)
        with self._connect() as conn:
            rows = conn.execute(query).all()
        return [machine_from_row(type_name, r) for r in rows]

    def count_by_state(self, type_name: str) -> dict[str, int]:
        table = self.table(type_name)
        with self._connect() as conn:
            rows = conn.execute(
                select(table.c.CurrentState, func.count()).group_by(table.c.CurrentState)
            ).all()
        return dict(rows)

    def runnable_backlog(self, type_name: str) -> int:
        table = self.table(type_name)
        with self._connect() as conn:
            return int(
                conn.execute(
                    select(func.count())
                    .select_from(table)
                    .where(table.c.NextRunTimestamp <= tables.utc_now())
                ).scalar_one()
            )

    def next_due(self, type_name: str) -> datetime | None:
        """When the earliest scheduled machine of this type becomes due (None if none)."""
        table = self.table(type_name)
        with self._connect() as conn:
            value = conn.execute(select(func.min(table.c.NextRunTimestamp))).scalar()
        return None if value is None else _as_datetime(value)


def _as_datetime(value: Any) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    result = utc(value)
    if result is None:
        raise StoreUnavailableError("the database returned no current time")
    return result
