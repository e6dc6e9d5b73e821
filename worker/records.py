"""Frozen records: a machine, a pending operator request, a history entry, an outbox event."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, Self, TypeVar

from worker.definition import Direction
from worker.errors import NotSerializableError
from worker.states import State

JsonObject = dict[str, Any]
T = TypeVar("T")


def utc(value: datetime | None) -> datetime | None:
    """Databases hand back naive datetimes; every time in the worker is UTC-aware."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def naive(value: datetime | None) -> datetime | None:
    """DATETIME columns hold UTC without a zone."""
    if value is None or value.tzinfo is None:
        return value
    return value.astimezone(UTC).replace(tzinfo=None)


def check_json(value: object, path: str = "data") -> None:
    """Raise NotSerializableError naming the first key whose value JSON cannot hold."""
    if value is None or isinstance(value, str | bool | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise NotSerializableError(path, "non-finite float")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise NotSerializableError(f"{path}[{key!r}] (key)", type(key).__name__)
            check_json(item, f"{path}.{key}")
        return
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            check_json(item, f"{path}[{index}]")
        return
    raise NotSerializableError(path, type(value).__name__)


_FIELD_NAMES: dict[type, frozenset[str]] = {}


def evolve(record: T, changes: dict[str, Any]) -> T:
    """`dataclasses.replace` for the frozen records on the hot path, without re-running
    `__init__` over every field (a machine has 26): three times faster, and a name that is not
    a field is still refused."""
    names = _FIELD_NAMES.get(type(record))
    if names is None:
        names = _FIELD_NAMES[type(record)] = frozenset(f.name for f in fields(record))  # type: ignore[arg-type]  # a dataclass
    unknown = changes.keys() - names
    if unknown:
        raise TypeError(f"{type(record).__name__} has no field(s) {sorted(unknown)}")
    copy = object.__new__(type(record))
    copy.__dict__.update(record.__dict__)
    copy.__dict__.update(changes)
    return copy


def dump_json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _from_iso(value: str | None) -> datetime | None:
    return None if value is None else utc(datetime.fromisoformat(value))


@dataclass(frozen=True)
class Request:
    """An operator or client command waiting for the machine's current step to end."""

    command: str
    command_id: str
    actor: str | None = None
    reason: str | None = None
    target_state: str | None = None

    def to_json(self) -> str:
        return dump_json(asdict(self))

    @classmethod
    def from_json(cls, text: str | None) -> Request | None:
        if not text:
            return None
        return cls(**json.loads(text))


_TIME_FIELDS = (
    "unlocked_at",
    "last_retry_at",
    "next_run_at",
    "created_at",
    "updated_at",
    "lease_expires_at",
)


@dataclass(frozen=True)
class Machine:
    """One machine instance as stored: the row of its type's table."""

    machine_type: str
    id: str
    lookup_key: str
    state: State
    step: int
    data: JsonObject
    fingerprint: str
    version: int = 0
    sequence: int = 0
    direction: Direction = Direction.FORWARD
    completed_steps: int = 0
    retry_count: int = 0
    last_error: str | None = None
    save_after_step: bool = True
    event_topic: str | None = None
    uses_global_lock: bool = False
    uses_local_lock: bool = False
    unlocked_at: datetime | None = None
    last_retry_at: datetime | None = None
    next_run_at: datetime | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    lease_owner: str | None = None
    lease_expires_at: datetime | None = None
    request: Request | None = None

    def evolve(self, **changes: Any) -> Self:
        return evolve(self, changes)

    @property
    def serialized_state(self) -> str:
        """The SerializedState column: the data plus the engine fields that have no column."""
        return dump_json(
            {
                "data": self.data,
                "engine": {
                    "sequence": self.sequence,
                    "direction": self.direction.value,
                    "completed_steps": self.completed_steps,
                    "last_error": self.last_error,
                },
            }
        )

    def to_json(self) -> str:
        """Serialize the whole record; `from_json` gives back an equal Machine."""
        fields = asdict(self)
        fields["state"] = self.state.value
        fields["direction"] = self.direction.value
        fields["request"] = None if self.request is None else asdict(self.request)
        for name in _TIME_FIELDS:
            fields[name] = _iso(getattr(self, name))
        return dump_json(fields)

    @classmethod
    def from_json(cls, text: str) -> Machine:
        fields = json.loads(text)
        fields["state"] = State(fields["state"])
        fields["direction"] = Direction(fields["direction"])
        fields["request"] = Request(**fields["request"]) if fields["request"] else None
        for name in _TIME_FIELDS:
            fields[name] = _from_iso(fields[name])
        return cls(**fields)


@dataclass(frozen=True)
class HistoryEntry:
    """One transition of one machine: a row of STATE_MACHINE_HISTORY."""

    machine_type: str
    machine_id: str
    sequence: int
    event_id: str
    event: str
    from_state: str
    to_state: str
    from_step: int | None
    to_step: int | None
    handler: str | None
    input_data: JsonObject | None
    output_data: JsonObject | None
    error: str | None
    attempt: int
    duration_ms: float | None
    occurred_at: datetime
    worker_id: str | None = None
    command_id: str | None = None
    actor: str | None = None
    reason: str | None = None

    def evolve(self, **changes: Any) -> Self:
        return evolve(self, changes)


@dataclass(frozen=True)
class OutboxEvent:
    """A transition event waiting to be published."""

    id: int
    event_id: str
    topic: str
    key: str
    payload: str
    created_at: datetime | None = field(default=None)


def transition_event(machine: Machine, entry: HistoryEntry) -> JsonObject:
    """The wire form of a transition event (schema/event.schema.json)."""
    return {
        "event_id": entry.event_id,
        "sequence": entry.sequence,
        "machine_type": machine.machine_type,
        "machine_id": machine.id,
        "lookup_key": machine.lookup_key,
        "from_state": entry.from_state,
        "to_state": entry.to_state,
        "event": entry.event,
        "step": entry.to_step,
        "handler": entry.handler,
        "data": machine.data,
        "error": entry.error,
        "command_id": entry.command_id,
        "occurred_at": entry.occurred_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
    }


def now_utc() -> datetime:
    return datetime.now(UTC)
