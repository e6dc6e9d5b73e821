"""The command consumer: a Kafka message becomes a recorded command, then a committed offset.

Each message is decoded and recorded (inbox row and machine change) in one transaction, and
only then is its offset committed. A refused command goes to the dead-letter topic first,
with a `command_rejected` event where the machine is known. While the database is down the
consumer backs off and reads the same message again; nothing later in that partition is
committed before it. Runs on one thread; the daemon owns it.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from worker.commands import apply_command
from worker.config import Settings
from worker.errors import (
    CommandRejectedError,
    DuplicateCommandError,
    MachineNotFoundError,
    StoreUnavailableError,
    WorkerError,
)
from worker.health import Health
from worker.hooks import Hooks
from worker.kafka_io import EventSink, PublishError
from worker.logs import scrub
from worker.messages import Command, CommandName, dead_letter_headers, decode_command
from worker.metrics import Metrics
from worker.records import Machine, dump_json, now_utc
from worker.states import State
from worker.store import Inbox, Store

log = structlog.get_logger("worker.consumer")

BACKOFF_FIRST = 0.1
BACKOFF_CAP = 5.0
UNEXPECTED_ATTEMPTS = 3
"""Tries to record a message that fails for a reason other than the database being down."""
LAG_SAMPLE_SECONDS = 5.0
UNKNOWN = "unknown"

Work = tuple[str, str]
"""(machine type, machine id) handed from the consumer to the executors."""


# -- pure decisions ------------------------------------------------------------------------


def backoff(failures: int) -> float:
    """Seconds to wait after `failures` failures in a row: 0.1 s, doubling, capped at 5 s."""
    return float(min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** max(failures - 1, 0)))


def refusal_outcome(error: WorkerError) -> str:
    """The command outcome label for a refused command."""
    return "duplicate" if isinstance(error, DuplicateCommandError) else "dead_lettered"


def rejection_event(
    command: Command,
    machine: Machine | None,
    error: WorkerError,
    *,
    event_id: str,
    now: datetime,
) -> dict[str, Any] | None:
    """The out-of-band `command_rejected` event (sequence 0), or None if there is no machine.

    A redelivered command (duplicate command id) was applied once already; its repeat is
    dead-lettered but announces nothing. A start that created nothing reports `pending`.
    """
    if isinstance(error, DuplicateCommandError) or not command.machine_id:
        return None
    if machine is not None:
        state, lookup_key, step = machine.state, machine.lookup_key, machine.step
    elif command.command is CommandName.START and command.lookup_key:
        state, lookup_key, step = State.PENDING, command.lookup_key, None
    else:
        return None
    return {
        "event_id": event_id,
        "sequence": 0,
        "machine_type": command.machine_type,
        "machine_id": command.machine_id,
        "lookup_key": lookup_key,
        "from_state": state.value,
        "to_state": state.value,
        "event": "command_rejected",
        "step": step,
        "handler": None,
        "data": {},
        "error": scrub(str(error)),
        "reason": error.reason_code,
        "command": command.command.value,
        "command_id": command.command_id,
        "occurred_at": now.astimezone(UTC).isoformat().replace("+00:00", "Z"),
    }


def partition_lag(high: int, position: int) -> int | None:
    """Messages not yet consumed; None while either offset is unknown (negative)."""
    if high < 0 or position < 0:
        return None
    return max(0, high - position)


@dataclass(frozen=True)
class Tries:
    """How often recording the message at `offset` failed: in all, and for unexpected reasons."""

    offset: int
    failures: int = 0
    unexpected: int = 0

    def evolve(self, **changes: int) -> Tries:
        return replace(self, **changes)


class Tally:
    """Thread-safe counts for the `worker.stopped` log line."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[name] += amount

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


# -- the consumer thread -------------------------------------------------------------------


class CommandConsumer:
    """Records each command in the database, then commits its offset; never the reverse."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        consumer: Consumer,
        sink: EventSink,
        *,
        hooks: Hooks,
        metrics: Metrics,
        health: Health,
        tally: Tally,
        fast_path: queue.Queue[Work],
        stopping: threading.Event,
    ) -> None:
        self.settings = settings
        self.store = store
        self.consumer = consumer
        self.sink = sink
        self.hooks = hooks
        self.metrics = metrics
        self.health = health
        self.tally = tally
        self.fast_path = fast_path
        self.stopping = stopping
        self._tries_by_partition: dict[tuple[str, int], Tries] = {}
        self._next_lag_sample = 0.0

    def run(self) -> None:
        self.consumer.subscribe(
            [self.settings.command_topic],
            on_assign=self._assigned,
            on_revoke=self._revoked,
            on_lost=self._revoked,
        )
        try:
            with self.store.holding_connection():
                while not self.stopping.is_set():
                    self.health.beat()
                    message = self.consumer.poll(self.settings.poll_interval)
                    if message is not None:
                        self._consume(message)
                    self._sample_lag()
        finally:
            self.consumer.close()
            log.info("consumer.closed", group_id=self.settings.group_id)

    def _consume(self, message: Message) -> None:
        error = message.error()
        if error is not None:
            self._kafka_error(error)
            return
        tries = self._tries(message)
        try:
            self._record(message, tries)
        except (StoreUnavailableError, PublishError) as exc:
            self._retry_later(message, exc, tries.evolve(failures=tries.failures + 1))
        except Exception as exc:  # a bug: try again, then dead-letter it (see `_record`)
            log.exception("command.failed", **_where(message))
            self._retry_later(
                message,
                exc,
                tries.evolve(failures=tries.failures + 1, unexpected=tries.unexpected + 1),
            )
        else:
            self._tries_by_partition.pop(_partition(message), None)

    def _record(self, message: Message, tries: Tries) -> None:
        command: Command | None = None
        try:
            command = decode_command(message.value())
            machine = apply_command(self.store, command, _inbox(command, message))
        except StoreUnavailableError:
            raise
        except WorkerError as exc:
            self._refuse(message, command, exc)
            self._commit(message)
            return
        except Exception as exc:
            if tries.unexpected + 1 < UNEXPECTED_ATTEMPTS:
                raise
            refusal = CommandRejectedError(
                f"the worker failed to record this command {UNEXPECTED_ATTEMPTS} times: "
                f"{type(exc).__name__}: {exc}",
                reason_code="internal_error",
            )
            self._refuse(message, command, refusal)
            self._commit(message)
            return
        self._commit(message)
        self.hooks.command(machine.machine_type, command.command.value, "applied")
        self.tally.add("commands_applied")
        with contextlib.suppress(queue.Full):  # it is due in its table; a scan finds it
            self.fast_path.put_nowait((machine.machine_type, machine.id))

    def _refuse(self, message: Message, command: Command | None, error: WorkerError) -> None:
        reason = error.reason_code
        detail = scrub(str(error))
        where = _where(message)
        headers = dead_letter_headers(
            reason, detail, where["topic"], where["partition"], where["offset"]
        )
        self._dead_letter(message, headers)
        rejection = self._rejection(command, error) if command is not None else None
        if rejection is not None:
            topic, key, payload = rejection
            self.sink.publish(topic, key, payload)
            self.sink.flush()
        machine_type, name = self._labels(command)
        log.info(
            "command.rejected",
            reason=reason,
            detail=detail,
            machine_type=machine_type,
            command=name,
            command_id=command.command_id if command else None,
            **where,
        )
        self.hooks.dead_letter(reason)
        self.hooks.command(machine_type, name, refusal_outcome(error))
        self.tally.add("commands_dead_lettered")

    def _dead_letter(self, message: Message, headers: list[tuple[str, bytes]]) -> None:
        """The original bytes, unchanged, unless the dead-letter topic refuses their size."""
        dlq = self.settings.dlq_topic
        try:
            self.sink.publish(dlq, message.key(), message.value(), headers)
            self.sink.flush()
        except PublishError as exc:
            if not exc.too_large:
                raise
            log.warning("command.dead_letter_value_dropped", dlq_topic=dlq, **_where(message))
            self.sink.publish(
                dlq, message.key(), None, [*headers, ("smw.value.omitted", b"too_large")]
            )
            self.sink.flush()

    def _rejection(self, command: Command, error: WorkerError) -> tuple[str, str, bytes] | None:
        definition = self.store.registry.get(command.machine_type)
        if definition is None or not command.machine_id:
            return None
        machine = None
        if not isinstance(error, DuplicateCommandError):
            try:
                machine = self.store.load(definition.name, command.machine_id)
            except MachineNotFoundError:
                machine = None
        event = rejection_event(command, machine, error, event_id=str(uuid.uuid4()), now=now_utc())
        if event is None:
            return None
        topic = (
            self.store.topic_for(machine)
            if machine is not None
            else definition.event_topic or self.store.default_topic
        )
        return topic, command.machine_id, dump_json(event).encode("utf-8")

    def _labels(self, command: Command | None) -> tuple[str, str]:
        """Metric labels; a type name is a label only if it is registered (bounded cardinality)."""
        if command is None:
            return UNKNOWN, UNKNOWN
        known = command.machine_type in self.store.registry
        return (command.machine_type if known else UNKNOWN), command.command.value

    def _commit(self, message: Message) -> None:
        """Commit the offset without waiting for the broker: the command is recorded already,
        so an offset lost in a crash means a redelivery, refused as a duplicate."""
        try:
            self.consumer.commit(message=message, asynchronous=True)
        except KafkaException as exc:
            log.warning("command.commit_failed", error=str(exc.args[0]), **_where(message))

    def _tries(self, message: Message) -> Tries:
        tries = self._tries_by_partition.get(_partition(message))
        if tries is None or tries.offset != message.offset():
            return Tries(message.offset() or 0)
        return tries

    def _retry_later(self, message: Message, error: Exception, tries: Tries) -> None:
        """Read the same message again after a pause; its offset stays uncommitted."""
        topic, partition = _partition(message)
        self._tries_by_partition[(topic, partition)] = tries
        wait = backoff(tries.failures)
        log.warning(
            "command.retry_later",
            error=scrub(str(error)),
            failures=tries.failures,
            retry_in=wait,
            **_where(message),
        )
        try:
            self.consumer.seek(TopicPartition(topic, partition, tries.offset))
        except KafkaException as exc:
            raise WorkerError(
                f"cannot rewind {topic}[{partition}] to offset {tries.offset} after a "
                f"failure: {exc.args[0]}; stopping so that no later offset is committed"
            ) from exc
        self.stopping.wait(wait)

    def _kafka_error(self, error: KafkaError) -> None:
        if error.fatal():
            raise WorkerError(
                f"the command consumer failed for good: {error.name()}: {error.str()}"
            )
        log.warning("kafka.consume_error", code=error.name(), reason=error.str())

    def _assigned(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        del consumer
        log.info("consumer.assigned", partitions=_names(partitions))

    def _revoked(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        del consumer
        log.info("consumer.revoked", partitions=_names(partitions))
        for tp in partitions:
            self._tries_by_partition.pop((tp.topic, tp.partition), None)
            with contextlib.suppress(KeyError):  # never sampled
                self.metrics.consumer_lag.remove(tp.topic, str(tp.partition))

    def _sample_lag(self) -> None:
        now = time.monotonic()
        if now < self._next_lag_sample:
            return
        self._next_lag_sample = now + LAG_SAMPLE_SECONDS
        try:
            positions = self.consumer.position(self.consumer.assignment())
            unknown = [tp for tp in positions if tp.offset < 0]
            if unknown:
                known = {(tp.topic, tp.partition): tp for tp in positions if tp.offset >= 0}
                for tp in self.consumer.committed(unknown, timeout=2.0):
                    known[(tp.topic, tp.partition)] = tp
                positions = list(known.values())
            for tp in positions:
                _, high = self.consumer.get_watermark_offsets(tp, cached=True)
                lag = partition_lag(high, tp.offset)
                if lag is not None:
                    self.metrics.consumer_lag.labels(
                        topic=tp.topic, partition=str(tp.partition)
                    ).set(lag)
        except KafkaException as exc:
            log.debug("consumer.lag_unavailable", error=str(exc.args[0]))


def _partition(message: Message) -> tuple[str, int]:
    return message.topic() or "", message.partition() or 0


def _where(message: Message) -> dict[str, Any]:
    return {
        "topic": message.topic() or "",
        "partition": message.partition() or 0,
        "offset": message.offset() or 0,
    }


def _names(partitions: list[TopicPartition]) -> list[str]:
    return [f"{tp.topic}[{tp.partition}]" for tp in partitions]


def _inbox(command: Command, message: Message) -> Inbox:
    return Inbox(
        command_id=command.command_id,
        command=command.command.value,
        machine_type=command.machine_type,
        machine_id=command.machine_id,
        topic=message.topic(),
        partition=message.partition(),
        offset=message.offset(),
    )
