"""Every table, as SQLAlchemy Core Table objects. All SQL the worker runs is built from these.

Per-type machine tables are named from validated, code-defined type names only.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import FunctionElement
from sqlalchemy.types import TypeEngine

from worker.definition import TYPE_NAME
from worker.errors import InvalidTypeNameError

Timestamp: TypeEngine[Any] = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
LongText: TypeEngine[Any] = Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
AutoId: TypeEngine[Any] = BigInteger().with_variant(Integer(), "sqlite")


def identifier(length: int) -> TypeEngine[Any]:
    """A VARCHAR id compared byte for byte: `m1`, `M1` and `mé1` are three ids, not one.

    MySQL and MariaDB compare strings by the column's collation, and a database's default
    (utf8mb4_general_ci, utf8mb4_unicode_ci, utf8mb4_0900_ai_ci) ignores case and accents:
    two distinct command ids would be one command (the second refused as a duplicate), two
    machine ids one machine, two lookup keys one lock. SQLite compares bytes already.
    """
    binary = mysql.VARCHAR(length, charset="utf8mb4", collation="utf8mb4_bin")
    return String(length).with_variant(binary, "mysql", "mariadb")


metadata = MetaData()

global_lock = Table(
    "GLOBAL_LOCK",
    metadata,
    Column("ID", AutoId, primary_key=True, autoincrement=True),
    Column("StateMachineType", String(48), nullable=False),
    Column("StateMachineID", identifier(128), nullable=False),
    Column("LookupKey", identifier(191), nullable=False),
    Column("LockTimestamp", Timestamp, nullable=False),
    Column("UnlockTimestamp", Timestamp, nullable=True),
    Index("ix_global_lock_key", "LookupKey", "UnlockTimestamp"),
    Index("ix_global_lock_machine", "StateMachineType", "StateMachineID"),
)

lookup_key_mutex = Table(
    "LOOKUP_KEY_MUTEX",
    metadata,
    Column("LookupKey", identifier(191), primary_key=True),
)
"""One row per lookup key; lock acquisition serialises on it with SELECT ... FOR UPDATE."""

type_lock = Table(
    "STATE_MACHINE_TYPE_LOCK",
    metadata,
    Column("StateMachineType", String(48), primary_key=True),
    Column("LockKind", String(16), nullable=False),
    Column("LockTimestamp", Timestamp, nullable=False),
    Column("UnlockTimestamp", Timestamp, nullable=True),
    Column("Actor", String(256), nullable=True),
    Column("Reason", Text, nullable=True),
)

history = Table(
    "STATE_MACHINE_HISTORY",
    metadata,
    Column("ID", AutoId, primary_key=True, autoincrement=True),
    Column("StateMachineType", String(48), nullable=False),
    Column("StateMachineID", identifier(128), nullable=False),
    Column("Sequence", Integer, nullable=False),
    Column("EventID", identifier(36), nullable=False, unique=True),
    Column("Event", String(32), nullable=False),
    Column("FromState", String(32), nullable=False),
    Column("ToState", String(32), nullable=False),
    Column("FromStep", Integer, nullable=True),
    Column("ToStep", Integer, nullable=True),
    Column("Handler", String(100), nullable=True),
    Column("InputData", LongText, nullable=True),
    Column("OutputData", LongText, nullable=True),
    Column("Error", Text, nullable=True),
    Column("Attempt", Integer, nullable=False),
    Column("DurationMs", Float, nullable=True),
    Column("WorkerID", String(128), nullable=True),
    Column("CommandID", identifier(128), nullable=True),
    Column("Actor", String(256), nullable=True),
    Column("Reason", Text, nullable=True),
    Column("OccurredTimestamp", Timestamp, nullable=False),
    UniqueConstraint("StateMachineType", "StateMachineID", "Sequence", name="uq_history_seq"),
)

outbox = Table(
    "EVENT_OUTBOX",
    metadata,
    Column("ID", AutoId, primary_key=True, autoincrement=True),
    Column("EventID", identifier(36), nullable=False, unique=True),
    Column("Topic", String(249), nullable=False),
    Column("MessageKey", identifier(128), nullable=False),
    Column("Payload", LongText, nullable=False),
    Column("CreatedTimestamp", Timestamp, nullable=False),
    Column("PublishedTimestamp", Timestamp, nullable=True),
    Index("ix_outbox_unpublished", "PublishedTimestamp", "ID"),
)

outbox_relay = Table(
    "EVENT_OUTBOX_RELAY",
    metadata,
    Column("Name", String(32), primary_key=True),
)
"""A single row; the relay that holds its row lock is the one publishing, keeping order."""

processed_command = Table(
    "PROCESSED_COMMAND",
    metadata,
    Column("CommandID", identifier(128), primary_key=True),
    Column("Command", String(16), nullable=False),
    Column("StateMachineType", String(48), nullable=False),
    Column("StateMachineID", identifier(128), nullable=True),
    Column("Outcome", String(32), nullable=False),
    Column("KafkaTopic", String(249), nullable=True),
    Column("KafkaPartition", Integer, nullable=True),
    Column("KafkaOffset", BigInteger, nullable=True),
    Column("ReceivedTimestamp", Timestamp, nullable=False),
    Index("ix_processed_command_received", "ReceivedTimestamp"),
)

operator_audit = Table(
    "OPERATOR_AUDIT",
    metadata,
    Column("ID", AutoId, primary_key=True, autoincrement=True),
    Column("Action", String(32), nullable=False),
    Column("Target", String(400), nullable=False),
    Column("Actor", String(256), nullable=False),
    Column("Reason", Text, nullable=False),
    Column("OccurredTimestamp", Timestamp, nullable=False),
)


def shared_table_names() -> list[str]:
    """The tables every deployment has, whatever its machine types."""
    return [
        global_lock.name,
        lookup_key_mutex.name,
        type_lock.name,
        history.name,
        outbox.name,
        outbox_relay.name,
        processed_command.name,
        operator_audit.name,
    ]


def machine_table_name(type_name: str) -> str:
    if not TYPE_NAME.fullmatch(type_name):
        raise InvalidTypeNameError(type_name)
    return f"STATE_MACHINE_{type_name.upper()}"


def machine_table(type_name: str, meta: MetaData = metadata) -> Table:
    """The per-type table, with the seed's column names plus what the engine needs."""
    name = machine_table_name(type_name)
    if name in meta.tables:
        return meta.tables[name]
    short = type_name[:40]
    return Table(
        name,
        meta,
        Column("ID", identifier(128), primary_key=True),
        Column("Name", String(48), nullable=False),
        Column("LookupKey", identifier(191), nullable=False),
        Column("CurrentState", String(32), nullable=False),
        Column("ResumeFromStep", Integer, nullable=False),
        Column("SaveAfterStep", Boolean, nullable=False),
        Column("KafkaEventTopic", String(249), nullable=True),
        Column("SerializedState", LongText, nullable=False),
        Column("CreatedTimestamp", Timestamp, nullable=False),
        Column("UpdatedTimestamp", Timestamp, nullable=False),
        Column("UsesGlobalLock", Boolean, nullable=False),
        Column("UsesLocalLock", Boolean, nullable=False),
        Column("UnlockedTimestamp", Timestamp, nullable=True),
        Column("LastRetryTimestamp", Timestamp, nullable=True),
        Column("Version", BigInteger, nullable=False),
        Column("RetryCount", Integer, nullable=False),
        Column("NextRunTimestamp", Timestamp, nullable=True),
        Column("LeaseOwner", String(128), nullable=True),
        Column("LeaseExpiresTimestamp", Timestamp, nullable=True),
        Column("DefinitionFingerprint", Text, nullable=False),
        Column("PendingRequest", Text, nullable=True),
        Index(f"ix_{short}_lookup", "LookupKey", "CurrentState"),
        Index(f"ix_{short}_runnable", "NextRunTimestamp"),
        Index(f"ix_{short}_state", "CurrentState", "UpdatedTimestamp"),
    )


class utc_now(FunctionElement[Any]):  # noqa: N801  # reads like the SQL function it renders
    """The database's current UTC time; lease and lock decisions use it, not the host clock."""

    type = Timestamp
    inherit_cache = True


class utc_now_plus(FunctionElement[Any]):  # noqa: N801  # reads like the SQL function it renders
    """The database's current UTC time plus a whole number of milliseconds."""

    type = Timestamp
    inherit_cache = True


@compiles(utc_now, "mysql")
def _utc_now_mysql(element: utc_now, compiler: Any, **kw: Any) -> str:
    del element, compiler, kw
    return "UTC_TIMESTAMP(6)"


@compiles(utc_now, "sqlite")
def _utc_now_sqlite(element: utc_now, compiler: Any, **kw: Any) -> str:
    del element, compiler, kw
    return "strftime('%Y-%m-%d %H:%M:%f', 'now')"


@compiles(utc_now_plus, "mysql")
def _utc_now_plus_mysql(element: utc_now_plus, compiler: Any, **kw: Any) -> str:
    (millis,) = list(element.clauses)
    return f"TIMESTAMPADD(MICROSECOND, 1000 * {compiler.process(millis, **kw)}, UTC_TIMESTAMP(6))"


@compiles(utc_now_plus, "sqlite")
def _utc_now_plus_sqlite(element: utc_now_plus, compiler: Any, **kw: Any) -> str:
    (millis,) = list(element.clauses)
    return (
        "strftime('%Y-%m-%d %H:%M:%f', 'now', "
        f"'+' || ({compiler.process(millis, **kw)} / 1000.0) || ' seconds')"
    )
