"""Helpers for the daemon tests: topics, worker processes, and reading back what they did.

A `Stack` is one test's world: a fresh database (conftest's `fresh_mysql_url`), its own
command, event and dead-letter topics and consumer group, and the `smw worker` processes it
spawned (killed at the end).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from confluent_kafka import (
    Consumer,
    ConsumerGroupState,
    KafkaError,
    KafkaException,
    Message,
    Producer,
)
from confluent_kafka.admin import AdminClient, NewTopic

from worker import tables

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[2]
HANDLERS = "tests.integration.daemon_sagas"
SMW = Path(sys.executable).with_name("smw")
TOPIC_MAX_BYTES = 2 * 1024 * 1024
"""Command and dead-letter topics accept messages over the worker's 1 MiB command limit."""
LEASE_SECONDS = 5
WAIT = 120.0
SAGA = "daemon_saga"
TERMINAL = {"completed", "failed", "rollback_completed", "cancelled"}


def wait_for(
    what: str | Callable[[], str], probe: Callable[[], T | None], timeout: float = WAIT
) -> T:
    """Poll `probe` until it returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            described = what() if callable(what) else what
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {described}")
        time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(port: int, path: str) -> tuple[int, bytes]:
    try:
        url = f"http://127.0.0.1:{port}{path}"
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def command(kind: str, machine_id: str, **fields: Any) -> dict[str, Any]:
    body = {
        "command_id": f"{kind}-{machine_id}-{uuid.uuid4().hex[:8]}",
        "command": kind,
        "machine_type": SAGA,
        "machine_id": machine_id,
    }
    return {**body, **fields}


def start(machine_id: str, lookup_key: str, **data: Any) -> dict[str, Any]:
    return command("start", machine_id, lookup_key=lookup_key, data=data)


def encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload).encode("utf-8")


@dataclass
class Sent:
    key: str
    value: bytes | None
    partition: int = -1
    offset: int = -1


@dataclass
class WorkerProcess:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    metrics_port: int

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.alive:
            self.process.send_signal(sig)
        return self.process.wait(timeout)

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            with suppress(ValueError):
                events.append(json.loads(line))
        return events


@dataclass
class Stack:
    """One test's database, topics, group and workers."""

    database_url: str
    kafka: str
    log_dir: Path
    command_partitions: int = 6
    suffix: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    workers: list[WorkerProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.command_topic = f"smw.test.{self.suffix}.commands"
        self.event_topic = f"smw.test.{self.suffix}.events"
        self.dlq_topic = f"smw.test.{self.suffix}.dlq"
        self.group_id = f"smw-test-{self.suffix}"
        self.admin = AdminClient({"bootstrap.servers": self.kafka})
        self.db = sa.create_engine(self.database_url)
        self.producer = Producer(
            {"bootstrap.servers": self.kafka, "linger.ms": 5, "message.max.bytes": 3 * 1024 * 1024}
        )
        big = {"max.message.bytes": str(TOPIC_MAX_BYTES)}
        self._create_topics(
            [
                NewTopic(self.command_topic, self.command_partitions, 1, config=big),
                NewTopic(self.event_topic, 3, 1),
                NewTopic(self.dlq_topic, 1, 1, config=big),
            ]
        )

    def _create_topics(self, topics: list[NewTopic]) -> None:
        for future in self.admin.create_topics(topics).values():
            future.result(timeout=30)

    def close(self) -> None:
        for worker in self.workers:
            if worker.alive:
                worker.process.kill()
                worker.process.wait(30)
        self.db.dispose()
        topics = [self.command_topic, self.event_topic, self.dlq_topic]
        for future in self.admin.delete_topics(topics).values():
            with suppress(KafkaException):
                future.result(timeout=30)

    # -- workers --------------------------------------------------------------------------

    def env(self, name: str, **overrides: str) -> dict[str, str]:
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("SMW_")}
        return {
            **inherited,
            "PYTHONPATH": str(REPO),
            "SMW_DATABASE_URL": self.database_url,
            "SMW_KAFKA_BOOTSTRAP": self.kafka,
            "SMW_COMMAND_TOPIC": self.command_topic,
            "SMW_EVENT_TOPIC": self.event_topic,
            "SMW_DLQ_TOPIC": self.dlq_topic,
            "SMW_GROUP_ID": self.group_id,
            "SMW_HANDLERS": HANDLERS,
            "SMW_LEASE_SECONDS": str(LEASE_SECONDS),
            "SMW_LOG_FORMAT": "json",
            "SMW_WORKER_ID": f"{name}-{self.suffix}",
            "SMW_METRICS_PORT": str(free_port()),
            **overrides,
        }

    def spawn(self, name: str, *, ready: bool = True, **overrides: str) -> WorkerProcess:
        """Start `smw worker`; with `ready`, wait until it serves /healthz (schema in place)."""
        env = self.env(name, **overrides)
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [str(SMW), "worker"], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT
            )
        worker = WorkerProcess(name, process, log_path, int(env["SMW_METRICS_PORT"]))
        self.workers.append(worker)
        if ready:
            self.wait_ready(worker)
        return worker

    def wait_ready(self, worker: WorkerProcess) -> None:
        def ready() -> bool:
            assert worker.alive, worker.log_path.read_text(encoding="utf-8")[-3000:]
            with suppress(OSError):
                return http_get(worker.metrics_port, "/healthz")[0] == 200
            return False

        wait_for(f"{worker.name} to serve /healthz", ready)

    def wait_for_group(self, members: int) -> None:
        def stable() -> bool:
            description = self.admin.describe_consumer_groups([self.group_id])[self.group_id]
            group = description.result(timeout=10)
            assigned = [m for m in group.members if m.assignment.topic_partitions]
            return group.state == ConsumerGroupState.STABLE and len(assigned) == members

        wait_for(f"{members} consumers to share the command topic", stable)

    # -- Kafka ----------------------------------------------------------------------------

    def send(self, *messages: tuple[str, bytes | dict[str, Any] | None]) -> list[Sent]:
        """Produce (key, value) pairs in order; returns where each one landed."""
        sent = []
        for key, value in messages:
            raw = encode(value) if isinstance(value, dict) else value
            record = Sent(key, raw)
            sent.append(record)
            self.producer.produce(
                self.command_topic, value=raw, key=key, on_delivery=_landed(record)
            )
            self.producer.poll(0)
        assert self.producer.flush(30) == 0
        assert all(s.offset >= 0 for s in sent), sent
        return sent

    def read(
        self, topic: str, done: Callable[[list[Message]], bool], timeout: float = WAIT
    ) -> list[Message]:
        """Every message on `topic` from the beginning, until `done(messages)` holds."""
        consumer = Consumer(
            {
                "bootstrap.servers": self.kafka,
                "group.id": f"smw-test-reader-{uuid.uuid4().hex[:8]}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        consumer.subscribe([topic])
        messages: list[Message] = []
        deadline = time.monotonic() + timeout
        try:
            while not done(messages):
                if time.monotonic() > deadline:
                    pytest.fail(f"timed out reading {topic}: {len(messages)} messages so far")
                message = consumer.poll(0.5)
                if message is None:
                    continue
                error = message.error()
                if error is not None and error.code() != KafkaError._PARTITION_EOF:
                    raise KafkaException(error)
                messages.append(message)
        finally:
            consumer.close()
        return messages

    # -- database -------------------------------------------------------------------------

    def machines(self) -> dict[str, Any]:
        table = tables.machine_table(SAGA)
        with self.db.connect() as conn:
            return {row.ID: row for row in conn.execute(sa.select(table))}

    def states(self, ids: Iterable[str] | None = None) -> dict[str, str]:
        found = {i: row.CurrentState for i, row in self.machines().items()}
        return found if ids is None else {i: found.get(i, "absent") for i in ids}

    def history(self) -> list[Any]:
        h = tables.history
        with self.db.connect() as conn:
            return list(conn.execute(sa.select(h).order_by(h.c.ID)))

    def processed_commands(self) -> list[str]:
        p = tables.processed_command
        with self.db.connect() as conn:
            return list(conn.execute(sa.select(p.c.CommandID)).scalars())

    def wait_states(self, expected: dict[str, str], timeout: float = WAIT) -> None:
        wait_for(
            lambda: f"machine states {expected}; found {self.states(expected)}",
            lambda: self.states(expected) == expected,
            timeout,
        )


def _landed(record: Sent) -> Callable[[KafkaError | None, Message], None]:
    def delivered(error: KafkaError | None, message: Message) -> None:
        if error is None:
            record.partition = message.partition() or 0
            record.offset = message.offset() or 0

    return delivered


def headers_of(message: Message) -> dict[str, str]:
    return {k: (v or b"").decode("utf-8") for k, v in message.headers() or []}


def events_by_machine(messages: Iterable[Message]) -> dict[str, list[dict[str, Any]]]:
    """Transition events per machine id, in the order they were read."""
    found: dict[str, list[dict[str, Any]]] = {}
    for message in messages:
        event = json.loads(message.value() or b"null")
        found.setdefault(event["machine_id"], []).append(event)
    return found
