"""The Kafka seam: the command consumer, the producer, and the event sink they publish through.

Everything that touches confluent-kafka is built here. `KafkaEventSink` publishes for the
outbox relay and the dead-letter path; `MemorySink` is its in-memory twin for the unit tests
and the demo. librdkafka's own log lines become structlog `kafka.log` events.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from worker.config import Settings
from worker.errors import WorkerError

Headers = Sequence[tuple[str, bytes]]
Key = str | bytes | None

KAFKA_LOGGER = "worker.kafka"
PRODUCER_MAX_MESSAGE_BYTES = 8 * 1024 * 1024
"""Large enough to dead-letter any command the command topic accepted, unchanged."""

log = structlog.get_logger(KAFKA_LOGGER)


@dataclass(frozen=True)
class DeliveryFailure:
    topic: str
    code: str
    reason: str


class PublishError(WorkerError):
    """Kafka did not acknowledge every message; the caller must treat none as published."""

    reason_code = "publish_failed"

    def __init__(self, failures: Sequence[DeliveryFailure]) -> None:
        self.failures = tuple(failures)
        first = self.failures[0]
        super().__init__(
            f"{len(self.failures)} message(s) were not acknowledged by Kafka; first: topic "
            f"{first.topic!r}: {first.code}: {first.reason}; they will be published again"
        )

    @property
    def too_large(self) -> bool:
        """True when every failure is a message the broker or client refuses for its size."""
        return all(f.code == "MSG_SIZE_TOO_LARGE" for f in self.failures)


class EventSink(Protocol):
    """Where published messages go. `flush` raises PublishError if any delivery failed."""

    def publish(self, topic: str, key: Key, value: bytes | None, headers: Headers = ()) -> None: ...

    def flush(self, timeout: float = 30.0) -> None: ...


class KafkaEventSink:
    """An EventSink over one idempotent producer. Use each sink from one thread at a time."""

    def __init__(self, producer: Producer) -> None:
        self.producer = producer
        self._failures: list[DeliveryFailure] = []

    def publish(self, topic: str, key: Key, value: bytes | None, headers: Headers = ()) -> None:
        while True:
            try:
                self.producer.produce(
                    topic,
                    value=value,
                    key=key,
                    headers=list(headers) or None,
                    on_delivery=self._delivered,
                )
            except BufferError:
                self.producer.poll(0.1)  # the local queue is full: serve deliveries, try again
                continue
            except KafkaException as exc:
                self._failures.append(_failure(topic, exc.args[0]))
            return

    def flush(self, timeout: float = 30.0) -> None:
        remaining = self.producer.flush(timeout)
        failures, self._failures = self._failures, []
        if remaining:
            failures.append(
                DeliveryFailure("*", "_TIMED_OUT", f"{remaining} not acknowledged in {timeout}s")
            )
        if failures:
            raise PublishError(failures)

    def close(self, timeout: float = 10.0) -> None:
        self.producer.flush(timeout)

    def _delivered(self, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            self._failures.append(_failure(message.topic() or "?", error))


def _failure(topic: str, error: object) -> DeliveryFailure:
    if isinstance(error, KafkaError):
        return DeliveryFailure(topic, error.name(), error.str())
    return DeliveryFailure(topic, "_UNKNOWN", str(error))


@dataclass(frozen=True)
class Published:
    topic: str
    key: Key
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()


class MemorySink:
    """The in-memory twin of KafkaEventSink. Set `failure` to make the next flushes fail."""

    def __init__(self) -> None:
        self.published: list[Published] = []
        self.failure: str | None = None
        self._pending: list[Published] = []

    def publish(self, topic: str, key: Key, value: bytes | None, headers: Headers = ()) -> None:
        self._pending.append(Published(topic, key, value, tuple(headers)))

    def flush(self, timeout: float = 30.0) -> None:
        del timeout
        pending, self._pending = self._pending, []
        if self.failure is not None:
            raise PublishError(
                [DeliveryFailure(p.topic, "_TRANSPORT", self.failure) for p in pending]
            )
        self.published.extend(pending)

    def on(self, topic: str) -> list[Published]:
        """The messages published to one topic, in order."""
        return [p for p in self.published if p.topic == topic]


class LibrdkafkaLog:
    """librdkafka's log lines as `kafka.log` events; librdkafka calls `log(level, fmt, ...)`."""

    def log(self, level: int, fmt: str, *args: Any) -> None:
        if len(args) == 3:
            facility, client, message = (str(a) for a in args)
        else:
            facility, client, message = "", "", fmt % args
        log.log(level, "kafka.log", facility=facility, client=client, message=message)


def _client_config(settings: Settings, **extra: Any) -> dict[str, Any]:
    return {
        "client.id": f"smw-{settings.worker_id}",
        "logger": LibrdkafkaLog(),
        **settings.kafka_common(),
        **extra,
    }


def _on_error(on_fatal: Callable[[str], None] | None) -> Callable[[KafkaError], None]:
    def error_cb(error: KafkaError) -> None:
        log.warning("kafka.error", code=error.name(), reason=error.str(), fatal=error.fatal())
        if error.fatal() and on_fatal is not None:
            on_fatal(f"{error.name()}: {error.str()}")

    return error_cb


def _on_commit(error: KafkaError | None, partitions: list[TopicPartition]) -> None:
    """Asynchronous offset commits report here; a lost one only means a redelivery."""
    if error is not None:
        log.warning(
            "kafka.offset_commit_failed",
            code=error.name(),
            reason=error.str(),
            partitions=[f"{tp.topic}[{tp.partition}]@{tp.offset}" for tp in partitions],
        )


def make_consumer(settings: Settings, *, on_fatal: Callable[[str], None] | None = None) -> Consumer:
    """The command consumer: one group for all replicas, offsets committed by the worker only."""
    return Consumer(
        {
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "cooperative-sticky",
            **_client_config(settings),
            "group.id": settings.group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "error_cb": _on_error(on_fatal),
            "on_commit": _on_commit,
        }
    )


def make_producer(settings: Settings, *, on_fatal: Callable[[str], None] | None = None) -> Producer:
    """An idempotent producer: acks from all in-sync replicas, per-partition order kept."""
    return Producer(
        {
            "linger.ms": 5,
            "message.max.bytes": PRODUCER_MAX_MESSAGE_BYTES,
            **_client_config(settings),
            "enable.idempotence": True,
            "acks": "all",
            "error_cb": _on_error(on_fatal),
        }
    )


def make_admin(settings: Settings) -> AdminClient:
    return AdminClient(_client_config(settings))
