"""Database connection faults at each commit point of a running worker (in-process daemon).

One `Daemon` runs against a real MariaDB and Kafka, with a fault injector on its database
engine. Each test arms one fault for one new machine, at one commit point:

- `command`:  the consumer's transaction that records a start command (inbox + machine);
- `claim`:    an executor's claim of the machine (SKIP LOCKED select + lease update);
- `start`:    the transition that takes the lock and opens the machine;
- `step`:     the transition after the middle step (step2) succeeded;
- `terminal`: the last transition (completed), which releases the lock;
- `relay`:    the relay's transaction that marks published events,

and one fault kind:

- `lost_before_commit`: the connection's socket is shut down just before COMMIT is sent; the
  server rolls the transaction back and the client sees "server has gone away";
- `killed_in_transaction`: right after the transaction's key statement, another session
  runs `KILL CONNECTION` on it; its next statement (or COMMIT) fails;
- `lost_after_commit`: COMMIT succeeds on the server, then the client sees "lost connection"
  (the ambiguous case: the work is done but the worker cannot know it).

Then the machine must complete with exactly the history of a fault-free run (no lost and no
repeated transition, sequences 1..7), its command recorded once, every committed event on
Kafka (repeats only when the relay's mark was lost), nothing dead-lettered except the
redelivered repeat of an already recorded command, and every step run exactly once.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import MySQLdb
import pytest
import sqlalchemy as sa
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.sql import Insert, Select, Update, visitors
from sqlalchemy.sql.elements import BindParameter

from tests.chaos.harness import read_topic
from tests.conftest import kafka_bootstrap, mysql_server_url, service_missing
from tests.integration.daemon_helpers import wait_for
from worker import LockPolicy, MachineType, RetryPolicy, Step, StepContext, tables
from worker.config import Settings
from worker.daemon import Daemon
from worker.definition import Registry

pytestmark = pytest.mark.integration

TYPE = "fault_saga"
STEPS = 5
LEASE_SECONDS = 2.0
POINTS = ("command", "claim", "start", "step", "terminal", "relay")
KINDS = ("lost_before_commit", "killed_in_transaction", "lost_after_commit")
PLAIN_HISTORY = ["created", "started", *["step_succeeded"] * STEPS]
RECOVERY_LIMIT = LEASE_SECONDS + 20.0
"""A fault costs at most a lease plus the retry backoff before the machine moves on."""

runs_metadata = sa.MetaData()
step_runs = sa.Table(
    "FAULT_STEP_RUN",
    runs_metadata,
    sa.Column("ID", sa.BigInteger, primary_key=True, autoincrement=True),
    sa.Column("MachineID", sa.String(128), nullable=False),
    sa.Column("Step", sa.Integer, nullable=False),
    sa.Column("Pid", sa.Integer, nullable=False),
)


# -- the fault injector --------------------------------------------------------------------


@dataclass(frozen=True)
class Statement:
    """What one executed statement was: its verb, table and the strings it bound."""

    verb: str
    table: str
    values: frozenset[str]
    skip_locked: bool


_DRIVER_SQL = re.compile(r"^\s*(INSERT INTO|UPDATE)\s+`?(\w+)`?", re.IGNORECASE)


def describe(element: Any, multiparams: Any, params: Any) -> Statement:
    """A Core statement, or the SQL text the store sends for its per-step statements."""
    values = set(_strings(_dicts_and_tuples(multiparams)))
    values.update(_strings(_dicts_and_tuples(params)))
    if isinstance(element, str):
        found = _DRIVER_SQL.match(element)
        if found is None:
            return Statement("other", "", frozenset(values), skip_locked=False)
        verb = "insert" if found.group(1).upper().startswith("INSERT") else "update"
        return Statement(verb, found.group(2), frozenset(values), skip_locked=False)
    verb = {Insert: "insert", Update: "update", Select: "select"}.get(type(element), "other")
    table = ""
    if isinstance(element, Insert | Update):
        table = element.table.name  # type: ignore[union-attr]
    elif isinstance(element, Select):
        found_tables = {n.name for n in visitors.iterate(element) if isinstance(n, sa.Table)}
        table = ",".join(sorted(found_tables))
    if verb != "other":
        bound = [
            node.value
            for node in visitors.iterate(element)
            if isinstance(node, BindParameter) and node.value is not None
        ]
        values.update(_strings(bound))
    for_update = getattr(element, "_for_update_arg", None)
    skip_locked = for_update is not None and bool(for_update.skip_locked)
    return Statement(verb, table, frozenset(values), skip_locked)


def _dicts_and_tuples(value: Any) -> Iterator[Any]:
    """Every parameter value, from a dict, a tuple, or a list of either."""
    if isinstance(value, dict):
        yield from value.values()
    elif isinstance(value, list | tuple):
        for item in value:
            if isinstance(item, dict | list | tuple):
                yield from _dicts_and_tuples(item)
            else:
                yield item


def _strings(values: Any) -> Iterator[str]:
    for value in values:
        if isinstance(value, str):
            yield value
        elif isinstance(value, list | tuple):
            yield from _strings(value)


def _history_row(statements: list[Statement], machine_id: str, *wanted: str) -> bool:
    """A history INSERT for the machine that bound every wanted string (event, handler...)."""
    return any(
        s.verb == "insert"
        and s.table == tables.history.name
        and machine_id in s.values
        and all(v in s.values for v in wanted)
        for s in statements
    )


def matches(point: str, machine_id: str, statements: list[Statement]) -> bool:
    """Whether a transaction made of `statements` is the armed commit point."""
    machine_table = tables.machine_table_name(TYPE)
    if point == "command":
        return any(
            s.verb == "insert"
            and s.table == tables.processed_command.name
            and machine_id in s.values
            for s in statements
        )
    if point == "claim":
        claimed = any(s.skip_locked and s.table == machine_table for s in statements)
        return claimed and any(
            s.verb == "update" and s.table == machine_table and machine_id in s.values
            for s in statements
        )
    if point == "start":
        return _history_row(statements, machine_id, "started")
    if point == "step":
        return _history_row(statements, machine_id, "step_succeeded", "step2")
    if point == "terminal":
        return _history_row(statements, machine_id, "completed")
    if point == "relay":
        return any(s.verb == "update" and s.table == tables.outbox.name for s in statements)
    raise ValueError(point)


def shut_socket(dbapi_connection: Any) -> None:
    """The network goes away under the connection: both directions, as a cable pull would."""
    sock = socket.socket(fileno=os.dup(dbapi_connection.fileno()))
    try:
        sock.shutdown(socket.SHUT_RDWR)
    finally:
        sock.close()


@dataclass(frozen=True)
class Armed:
    point: str
    kind: str
    machine_id: str


class Faults:
    """Injects one armed fault into the first transaction of an engine that matches it."""

    def __init__(self, engine: sa.Engine, admin: sa.Engine) -> None:
        self.engine = engine
        self.admin = admin
        self._lock = threading.Lock()
        self._armed: Armed | None = None
        self._after_commit: set[int] = set()
        self.injected: list[Armed] = []
        self.errors: list[str] = []
        event.listen(engine, "begin", self._begin)
        event.listen(engine, "after_cursor_execute", self._after_cursor_execute)
        event.listen(engine, "commit", self._commit)
        real_commit = engine.dialect.do_commit

        def do_commit(connection: Any) -> None:
            real_commit(connection)
            dbapi = getattr(connection, "dbapi_connection", connection)
            with self._lock:
                ambiguous = id(dbapi) in self._after_commit
                self._after_commit.discard(id(dbapi))
            if ambiguous:
                shut_socket(dbapi)
                raise MySQLdb.OperationalError(
                    2013, "Lost connection to server during query (injected after COMMIT)"
                )

        engine.dialect.do_commit = do_commit  # type: ignore[method-assign,assignment]

    def arm(self, point: str, kind: str, machine_id: str) -> None:
        with self._lock:
            self._armed = Armed(point, kind, machine_id)

    def _take(self, statements: list[Statement], kinds: tuple[str, ...]) -> Armed | None:
        with self._lock:
            armed = self._armed
            if armed is None or armed.kind not in kinds:
                return None
            if not matches(armed.point, armed.machine_id, statements):
                return None
            self._armed = None
            self.injected.append(armed)
            return armed

    def _begin(self, conn: sa.Connection) -> None:
        conn.info["fault_statements"] = []

    def _after_cursor_execute(
        self, conn: sa.Connection, cursor: Any, statement: str, parameters: Any, *args: Any
    ) -> None:
        """Every statement sent, Core-built or the store's pre-compiled per-step SQL."""
        del cursor
        context = args[0]
        statements = conn.info.setdefault("fault_statements", [])
        compiled = getattr(context, "compiled", None)
        try:
            if compiled is not None:
                statements.append(describe(compiled.statement, context.compiled_parameters, {}))
            else:
                statements.append(describe(statement, parameters, {}))
        except Exception as exc:  # noqa: BLE001  # the injector must never break the worker
            self.errors.append(f"{type(exc).__name__}: {exc}")
            return
        if self._take(statements, ("killed_in_transaction",)) is not None:
            thread_id = int(conn.connection.dbapi_connection.thread_id())  # type: ignore[union-attr]
            with self.admin.connect() as admin:
                admin.execute(sa.text(f"KILL CONNECTION {thread_id}"))

    def _commit(self, conn: sa.Connection) -> None:
        statements = conn.info.get("fault_statements", [])
        armed = self._take(statements, ("lost_before_commit", "lost_after_commit"))
        if armed is None:
            return
        dbapi = conn.connection.dbapi_connection
        if armed.kind == "lost_before_commit":
            shut_socket(dbapi)
        else:
            with self._lock:
                self._after_commit.add(id(dbapi))


# -- the machine type ----------------------------------------------------------------------


class Recorder:
    """Counts step executions in FAULT_STEP_RUN over its own, fault-free engine."""

    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(url, pool_pre_ping=True, pool_size=2)

    def record(self, ctx: StepContext) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                sa.insert(step_runs).values(
                    MachineID=ctx.machine_id, Step=ctx.step_index, Pid=os.getpid()
                )
            )


class RecordedStep(Step):
    def __init__(self, index: int, recorder: Recorder) -> None:
        self.name = f"step{index}"
        self.recorder = recorder

    def forward(self, ctx: StepContext) -> dict[str, Any]:
        self.recorder.record(ctx)
        return {self.name: "done"}


# -- the rig: one database, one set of topics, one daemon ----------------------------------


@dataclass
class Rig:
    url: str
    kafka: str
    suffix: str
    daemon: Daemon
    faults: Faults
    db: sa.Engine
    producer: Producer
    settings: Settings

    def send_start(self, machine_id: str, lookup_key: str) -> str:
        command_id = f"start-{machine_id}"
        payload = {
            "command_id": command_id,
            "command": "start",
            "machine_type": TYPE,
            "machine_id": machine_id,
            "lookup_key": lookup_key,
            "data": {},
        }
        self.producer.produce(
            self.settings.command_topic, key=lookup_key, value=json.dumps(payload).encode()
        )
        assert self.producer.flush(30) == 0
        return command_id

    def state(self, machine_id: str) -> str | None:
        table = tables.machine_table(TYPE)
        with self.db.connect() as conn:
            return conn.execute(
                sa.select(table.c.CurrentState).where(table.c.ID == machine_id)
            ).scalar()

    def unpublished(self) -> int:
        o = tables.outbox
        with self.db.connect() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count()).where(o.c.PublishedTimestamp.is_(None))
                ).scalar_one()
            )


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    base = make_url(mysql_server_url())
    name = f"smw_faults_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(base.set(database=""), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"))
    except Exception as exc:  # noqa: BLE001  # any failure here means the service is missing
        admin.dispose()
        service_missing("MySQL/MariaDB", exc)
    bootstrap = kafka_bootstrap()
    kafka_admin = AdminClient({"bootstrap.servers": bootstrap})
    try:
        kafka_admin.list_topics(timeout=10)
    except Exception as exc:  # noqa: BLE001  # KafkaException of any kind: not reachable
        service_missing("Kafka", exc)
    url = base.set(database=name).render_as_string(hide_password=False)
    suffix = uuid.uuid4().hex[:8]
    settings = Settings(
        database_url=url,
        kafka_bootstrap=bootstrap,
        command_topic=f"smw.faults.{suffix}.commands",
        event_topic=f"smw.faults.{suffix}.events",
        dlq_topic=f"smw.faults.{suffix}.dlq",
        group_id=f"smw-faults-{suffix}",
        concurrency=2,
        metrics_port=0,
        lease_seconds=LEASE_SECONDS,
        worker_id=f"faults-{suffix}",
        poll_interval=0.2,
    )
    topics = [settings.command_topic, settings.event_topic, settings.dlq_topic]
    for future in kafka_admin.create_topics([NewTopic(t, 1, 1) for t in topics]).values():
        future.result(timeout=30)
    db = sa.create_engine(url, pool_pre_ping=True)
    runs_metadata.create_all(db)
    recorder = Recorder(url)
    machine_type = MachineType(
        name=TYPE,
        steps=tuple(RecordedStep(i, recorder) for i in range(STEPS)),
        lock_policy=LockPolicy.LOCAL,
        retry=RetryPolicy(base_delay=0.05, max_delay=0.2, max_attempts=5),
    )
    daemon = Daemon(settings, Registry([machine_type]))
    faults = Faults(daemon.store.engine, admin)
    daemon.start()
    rig = Rig(
        url,
        bootstrap,
        suffix,
        daemon,
        faults,
        db,
        Producer({"bootstrap.servers": bootstrap, "linger.ms": 1}),
        settings,
    )
    try:
        yield rig
    finally:
        daemon.request_stop("test over")
        daemon.shutdown()
        daemon.store.engine.dispose()
        recorder.engine.dispose()
        db.dispose()
        for future in kafka_admin.delete_topics(topics).values():
            future.exception(timeout=30)
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS `{name}`"))
        admin.dispose()


EACH_STEP_ONCE = dict.fromkeys(range(STEPS), 1)
"""How often each step runs, whatever the fault.

A transaction on a connection held across a machine's run (start, step, terminal) that dies
is tried once more on a new connection, so a lost or killed transition commits without
running its step again; after a lost COMMIT that did land, the retry's fenced UPDATE finds
the version moved and the engine leaves the machine to the next claim.
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("point", POINTS)
def test_a_connection_fault_at_a_commit_point_loses_nothing_and_repeats_nothing(
    rig: Rig, point: str, kind: str
) -> None:
    machine_id = f"{point}-{kind}-{uuid.uuid4().hex[:6]}"
    lookup_key = f"acct-{machine_id}"
    wait_for("the previous machines' events to be published", lambda: rig.unpublished() == 0)
    rig.faults.injected.clear()
    rig.faults.arm(point, kind, machine_id)
    began = time.monotonic()
    command_id = rig.send_start(machine_id, lookup_key)
    wait_for(
        lambda: f"{machine_id} to complete (state {rig.state(machine_id)})",
        lambda: rig.state(machine_id) == "completed",
        60,
    )
    took = time.monotonic() - began
    wait_for("its events to be published", lambda: rig.unpublished() == 0)

    assert rig.faults.errors == []
    assert [(a.point, a.kind) for a in rig.faults.injected] == [(point, kind)], "not injected"
    assert took < RECOVERY_LIMIT, f"took {took:.1f}s to complete after the fault"

    h = tables.history
    with rig.db.connect() as conn:
        rows = conn.execute(
            sa.select(h.c.Sequence, h.c.Event, h.c.EventID)
            .where(h.c.StateMachineID == machine_id)
            .order_by(h.c.Sequence)
        ).all()
        runs = Counter(
            conn.execute(
                sa.select(step_runs.c.Step).where(step_runs.c.MachineID == machine_id)
            ).scalars()
        )
        inbox = conn.execute(
            sa.select(tables.processed_command.c.CommandID).where(
                tables.processed_command.c.StateMachineID == machine_id
            )
        ).all()
        table = tables.machine_table(TYPE)
        locked = conn.execute(
            sa.select(table.c.UnlockedTimestamp, table.c.LeaseOwner).where(table.c.ID == machine_id)
        ).one()
    assert [r.Event for r in rows] == PLAIN_HISTORY
    assert [r.Sequence for r in rows] == list(range(1, len(PLAIN_HISTORY) + 1))
    assert dict(runs) == EACH_STEP_ONCE
    assert [r.CommandID for r in inbox] == [command_id]
    assert locked.UnlockedTimestamp is not None, "the lock was never released"
    assert locked.LeaseOwner is None

    events = [
        json.loads(m.value() or b"{}") for m in read_topic(rig.kafka, rig.settings.event_topic)
    ]
    mine = Counter(e["event_id"] for e in events if e.get("machine_id") == machine_id)
    assert set(mine) == {r.EventID for r in rows}, "an event is missing or was never committed"
    repeats = sum(mine.values()) - len(mine)
    if point == "relay" and kind != "lost_after_commit":
        assert repeats >= 1, "the relay's lost mark should have published its batch again"
    else:
        assert repeats == 0

    duplicate_expected = point == "command" and kind == "lost_after_commit"

    def dead_letters() -> list[str]:
        return [
            bytes(dict(m.headers() or []).get("smw.reason") or b"").decode()
            for m in read_topic(rig.kafka, rig.settings.dlq_topic)
            if (m.key() or b"").decode() == lookup_key
        ]

    reasons = (
        wait_for("the repeat to be dead-lettered", dead_letters, 30)
        if duplicate_expected
        else dead_letters()
    )
    if duplicate_expected:
        # The worker could not know its commit held: it read the command again and refused
        # the repeat as a duplicate instead of applying it twice.
        assert reasons == ["duplicate_command"]
    else:
        assert reasons == []
    assert rig.daemon.failure is None
    assert all(t.is_alive() for t in rig.daemon.threads.values())
