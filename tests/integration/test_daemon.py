"""The worker daemon end to end: `smw worker` processes against real MariaDB and Kafka.

Each test gets a fresh database and its own topics and consumer group; machines are the
five-step `daemon_saga` from daemon_sagas.py, whose data scripts retries, holds and rollbacks.
"""

from __future__ import annotations

import itertools
import json
import queue
import signal
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from confluent_kafka import TopicPartition

from tests.integration.daemon_helpers import (
    HANDLERS,
    LEASE_SECONDS,
    SAGA,
    TERMINAL,
    Stack,
    command,
    encode,
    events_by_machine,
    headers_of,
    http_get,
    start,
    wait_for,
)
from worker import tables
from worker.config import Settings
from worker.consumer import CommandConsumer, Tally
from worker.daemon import check
from worker.decisions import Decision
from worker.definition import Registry
from worker.errors import StoreUnavailableError
from worker.health import Health, HealthServer
from worker.hooks import Hooks
from worker.kafka_io import MemorySink, make_consumer
from worker.messages import validate_event
from worker.metrics import Metrics
from worker.records import Machine
from worker.relay import OutboxRelay
from worker.store import Inbox, Store

pytestmark = pytest.mark.integration

STEPS_DONE = ["step_succeeded"] * 5
EXPECTED_EVENTS = {
    "plain": ["created", "started", *STEPS_DONE],
    "retried": [
        "created",
        "started",
        "step_succeeded",
        "step_succeeded",
        "retry_scheduled",
        "retry_scheduled",
        "step_succeeded",
        "step_succeeded",
        "step_succeeded",
    ],
    "scripted_rollback": [
        "created",
        "started",
        *STEPS_DONE[:3],
        "rollback_started",
        *["step_compensated"] * 3,
    ],
    "paused": [
        "created",
        "started",
        *STEPS_DONE[:2],
        "retry_scheduled",
        "paused",
        "resumed",
        *STEPS_DONE[:3],
    ],
    "cancelled": ["created", "started", "step_succeeded", "retry_scheduled", "cancelled"],
    "rolled_back": [
        "created",
        "started",
        *STEPS_DONE[:3],
        "retry_scheduled",
        "rollback_started",
        *["step_compensated"] * 3,
    ],
}
SCRIPTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "retried": {"fail_at": 2, "failures": 2},
    "scripted_rollback": {"rollback_at": 3},
    "paused": {"hold_at": 2},
    "cancelled": {"hold_at": 1},
    "rolled_back": {"hold_at": 3},
}
FINAL_STATES = {
    "plain": "completed",
    "retried": "completed",
    "scripted_rollback": "rollback_completed",
    "paused": "completed",
    "cancelled": "cancelled",
    "rolled_back": "rollback_completed",
}


@pytest.fixture
def stack(fresh_mysql_url: str, kafka: str, tmp_path: Path) -> Iterator[Stack]:
    """A fresh database, this test's own topics and group; its workers are killed after."""
    stack = Stack(fresh_mysql_url, kafka, tmp_path)
    try:
        yield stack
    finally:
        stack.close()


def key(machine_id: str) -> str:
    return f"acct-{machine_id}"


def test_commands_drive_machines_and_each_transition_is_published_once_in_order(
    stack: Stack,
) -> None:
    worker = stack.spawn("w1")
    ids = {name: f"{name}-{stack.suffix}" for name in SCRIPTS}
    stack.send(*[(key(m), start(m, key(m), **SCRIPTS[name])) for name, m in ids.items()])
    stack.wait_states({ids[n]: "retry" for n in ("paused", "cancelled", "rolled_back")})

    pause = command("pause", ids["paused"])
    stack.send(
        (key(ids["paused"]), pause),
        (key(ids["cancelled"]), command("cancel", ids["cancelled"])),
        (key(ids["rolled_back"]), command("rollback", ids["rolled_back"])),
    )
    stack.wait_states({ids["paused"]: "paused"})
    stack.send((key(ids["paused"]), command("resume", ids["paused"])))
    stack.wait_states({ids[name]: state for name, state in FINAL_STATES.items()})

    rows: dict[str, list[Any]] = defaultdict(list)
    for row in stack.history():
        rows[row.StateMachineID].append(row)
    assert {name: [r.Event for r in rows[m]] for name, m in ids.items()} == EXPECTED_EVENTS
    assert [r.CommandID for r in rows[ids["paused"]] if r.Event == "paused"] == [
        pause["command_id"]
    ]

    total = sum(len(r) for r in rows.values())
    messages = stack.read(stack.event_topic, lambda found: len(found) >= total)
    events = events_by_machine(messages)
    for event in (e for found in events.values() for e in found):
        validate_event(event)
    assert sorted(m.key() or b"" for m in messages) == sorted(
        r.StateMachineID.encode() for found in rows.values() for r in found
    )
    assert Counter(e["event_id"] for found in events.values() for e in found) == Counter(
        r.EventID for found in rows.values() for r in found
    )
    for machine_id, found in rows.items():
        assert [e["sequence"] for e in events[machine_id]] == list(range(1, len(found) + 1))
        assert [
            (e["event_id"], e["sequence"], e["event"], e["from_state"], e["to_state"])
            for e in events[machine_id]
        ] == [(r.EventID, r.Sequence, r.Event, r.FromState, r.ToState) for r in found]

    status, body = http_get(worker.metrics_port, "/healthz")
    assert (status, json.loads(body)["status"]) == (200, "ok")
    _, metrics = http_get(worker.metrics_port, "/metrics")
    for name in ("start", "pause", "resume", "cancel", "rollback"):
        applied = 6 if name == "start" else 1
        line = f'smw_commands_total{{command="{name}",machine_type="{SAGA}",outcome="applied"}}'
        assert f"{line} {applied}.0".encode() in metrics
    series = parse_series(metrics.decode())
    transitions = sum(v for k, v in series.items() if k.startswith("smw_transitions_total{"))
    assert transitions == sum(len(found) - 1 for found in rows.values())  # all but `created`
    step_runs = sum(v for k, v in series.items() if k.startswith("smw_step_duration_seconds_count"))
    assert step_runs >= sum(
        1 for found in rows.values() for r in found if r.Event == "step_succeeded"
    )
    assert worker.stop() == 0


def parse_series(text: str) -> dict[str, float]:
    """Prometheus text format: series -> value (comments skipped)."""
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_a_redelivered_command_is_applied_once_and_its_repeat_is_dead_lettered(
    stack: Stack,
) -> None:
    worker = stack.spawn("w1")
    machine_id = f"once-{stack.suffix}"
    payload = start(machine_id, key(machine_id))
    raw = encode(payload)
    _, repeat = stack.send((key(machine_id), raw), (key(machine_id), raw))
    stack.wait_states({machine_id: "completed"})

    dead = stack.read(stack.dlq_topic, lambda found: len(found) >= 1)
    assert [m.value() for m in dead] == [raw]
    assert [m.key() for m in dead] == [key(machine_id).encode()]
    headers = headers_of(dead[0])
    assert {k: v for k, v in headers.items() if k != "smw.reason.detail"} == {
        "smw.reason": "duplicate_command",
        "smw.original.topic": stack.command_topic,
        "smw.original.partition": str(repeat.partition),
        "smw.original.offset": str(repeat.offset),
    }
    assert stack.processed_commands() == [payload["command_id"]]
    created = [r for r in stack.history() if r.Event == "created"]
    assert [r.StateMachineID for r in created] == [machine_id]
    assert worker.stop() == 0


def test_bad_input_is_dead_lettered_with_its_reason_and_good_commands_still_complete(
    stack: Stack,
) -> None:
    worker = stack.spawn("w1")
    done = f"done-{stack.suffix}"
    stack.send((key(done), start(done, key(done))))
    stack.wait_states({done: "completed"})

    good = [f"good{i}-{stack.suffix}" for i in range(4)]
    resume = command("resume", done)
    restart = start(done, key(done))
    batch: list[tuple[str, bytes | dict[str, Any] | None, str | None]] = [
        (key(good[0]), start(good[0], key(good[0])), None),
        ("bad", b"{not json", "malformed_json"),
        ("bad", None, "empty"),
        (
            "bad",
            {"command_id": "x1", "command": "explode", "machine_type": SAGA},
            "schema_violation",
        ),
        (key(good[1]), start(good[1], key(good[1])), None),
        ("bad", {**start("m1", "k1"), "machine_type": "no_such_saga"}, "unknown_machine_type"),
        ("bad", command("pause", f"ghost-{stack.suffix}"), "unknown_machine"),
        (key(good[2]), start(good[2], key(good[2])), None),
        ("bad", start(f"big-{stack.suffix}", "bad", blob="x" * 1_100_000), "oversized"),
        (key(done), resume, "invalid_for_state"),
        (key(done), restart, "duplicate_machine"),
        (key(good[3]), start(good[3], key(good[3])), None),
    ]
    sent = stack.send(*[(k, value) for k, value, _ in batch])
    expected = {
        (s.partition, s.offset): (reason, s.value)
        for s, (_, _, reason) in zip(sent, batch, strict=True)
        if reason is not None
    }
    stack.wait_states(dict.fromkeys(good, "completed"))

    dead = stack.read(stack.dlq_topic, lambda found: len(found) >= len(expected))
    found = {}
    for message in dead:
        headers = headers_of(message)
        assert headers["smw.original.topic"] == stack.command_topic
        where = (int(headers["smw.original.partition"]), int(headers["smw.original.offset"]))
        found[where] = (headers["smw.reason"], message.value())
    assert found == expected

    rejections = [
        event
        for event in events_by_machine(
            stack.read(
                stack.event_topic,
                lambda messages: (
                    sum(b'"command_rejected"' in (m.value() or b"") for m in messages) >= 2
                ),
            )
        )[done]
        if event["sequence"] == 0
    ]
    for event in rejections:
        validate_event(event)
    assert [
        (e["event"], e["reason"], e["command_id"], e["from_state"], e["to_state"], e["lookup_key"])
        for e in rejections
    ] == [
        (
            "command_rejected",
            "invalid_for_state",
            resume["command_id"],
            "completed",
            "completed",
            key(done),
        ),
        (
            "command_rejected",
            "duplicate_machine",
            restart["command_id"],
            "completed",
            "completed",
            key(done),
        ),
    ]

    assert worker.alive
    assert http_get(worker.metrics_port, "/healthz")[0] == 200
    _, metrics = http_get(worker.metrics_port, "/metrics")
    for reason, _ in expected.values():
        assert f'smw_dead_letters_total{{reason="{reason}"}} 1.0'.encode() in metrics
    assert worker.stop() == 0


def test_only_the_relay_holding_the_relay_lock_publishes(stack: Stack) -> None:
    store = Store(stack.database_url, Registry.from_modules([HANDLERS]))
    store.ensure_schema()
    outbox = tables.outbox
    with stack.db.begin() as conn:
        conn.execute(
            sa.insert(outbox),
            [
                {
                    "EventID": f"e{i}",
                    "Topic": "t",
                    "MessageKey": f"m{i}",
                    "Payload": "{}",
                    "CreatedTimestamp": datetime(2030, 1, 1),  # noqa: DTZ001  # naive UTC column
                }
                for i in range(3)
            ],
        )
    sink = MemorySink()
    relay = OutboxRelay(store, sink)
    with stack.db.connect() as other, other.begin():
        other.execute(sa.select(tables.outbox_relay).with_for_update())
        assert relay.publish_batch() == 0
        assert relay.busy_elsewhere
    assert relay.publish_batch() == 3
    assert not relay.busy_elsewhere
    assert [p.key for p in sink.published] == ["m0", "m1", "m2"]
    store.engine.dispose()


class ScriptedStore(Store):
    """A store whose `create_machine` fails as scripted: the database down, or a bug."""

    def __init__(self, url: str, event_topic: str) -> None:
        super().__init__(url, Registry.from_modules([HANDLERS]), default_topic=event_topic)
        self.failure: Exception | None = None
        self.calls = 0

    def create_machine(self, decision: Decision, inbox: Inbox | None = None) -> Machine:
        self.calls += 1
        if self.failure is not None:
            raise self.failure
        return super().create_machine(decision, inbox)


@dataclass
class InProcess:
    """A CommandConsumer on its own thread, publishing to a MemorySink."""

    stack: Stack
    store: ScriptedStore
    sink: MemorySink = field(default_factory=MemorySink)
    fast_path: queue.Queue[tuple[str, str]] = field(default_factory=queue.Queue)
    stopping: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.settings = Settings(
            kafka_bootstrap=self.stack.kafka,
            command_topic=self.stack.command_topic,
            event_topic=self.stack.event_topic,
            dlq_topic=self.stack.dlq_topic,
            group_id=self.stack.group_id,
            worker_id="in-process",
            poll_interval=0.2,
        )
        self.loop = CommandConsumer(
            self.settings,
            self.store,
            make_consumer(self.settings),
            self.sink,
            hooks=Hooks(),
            metrics=Metrics("test"),
            health=Health(),
            tally=Tally(),
            fast_path=self.fast_path,
            stopping=self.stopping,
        )
        self.thread = threading.Thread(target=self.loop.run)
        self.reader = make_consumer(self.settings)

    def committed(self, partition: int) -> int:
        wanted = TopicPartition(self.stack.command_topic, partition)
        return self.reader.committed([wanted], timeout=10)[0].offset

    def __enter__(self) -> InProcess:
        self.store.ensure_schema()
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopping.set()
        self.thread.join(30)
        self.reader.close()
        self.store.engine.dispose()


def test_while_the_database_is_down_a_command_is_read_again_and_its_offset_stays_open(
    stack: Stack,
) -> None:
    store = ScriptedStore(stack.database_url, stack.event_topic)
    store.failure = StoreUnavailableError("database unreachable (simulated by the test)")
    machine_id = f"patient-{stack.suffix}"
    (sent,) = stack.send((key(machine_id), start(machine_id, key(machine_id))))
    with InProcess(stack, store) as consumer:
        wait_for("three tries while the database is down", lambda: store.calls >= 3)
        assert consumer.committed(sent.partition) < 0
        assert stack.states() == {}
        store.failure = None
        wait_for(
            "the offset to be committed",
            lambda: consumer.committed(sent.partition) == sent.offset + 1,
        )
    assert stack.states() == {machine_id: "pending"}
    assert consumer.fast_path.get_nowait() == (SAGA, machine_id)
    assert consumer.sink.published == []
    assert consumer.loop.tally.snapshot() == {"commands_applied": 1}


def test_a_command_that_keeps_failing_unexpectedly_is_dead_lettered_after_three_tries(
    stack: Stack,
) -> None:
    store = ScriptedStore(stack.database_url, stack.event_topic)
    store.failure = RuntimeError("a bug in a handler module's import")
    machine_id = f"cursed-{stack.suffix}"
    payload = start(machine_id, key(machine_id))
    (sent,) = stack.send((key(machine_id), payload))
    with InProcess(stack, store) as consumer:
        wait_for(
            "the offset to be committed",
            lambda: consumer.committed(sent.partition) == sent.offset + 1,
        )
    assert store.calls == 3
    (dead,) = consumer.sink.on(stack.dlq_topic)
    assert (dead.key, dead.value) == (key(machine_id).encode(), sent.value)
    assert dict(dead.headers)["smw.reason"] == b"internal_error"
    (rejected,) = consumer.sink.on(stack.event_topic)
    event = json.loads(rejected.value or b"")
    validate_event(event)
    assert (event["event"], event["reason"], event["to_state"], event["command_id"]) == (
        "command_rejected",
        "internal_error",
        "pending",
        payload["command_id"],
    )
    assert event["error"] == (
        "the worker failed to record this command 3 times: "
        "RuntimeError: a bug in a handler module's import"
    )
    assert stack.states() == {}


def test_check_answers_0_when_both_services_answer_and_1_when_one_does_not(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = Registry.from_modules([HANDLERS])
    settings = Settings(
        database_url=stack.database_url,
        kafka_bootstrap=stack.kafka,
        command_topic=stack.command_topic,
    )
    assert check(settings, registry) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":", 1)[0] for line in lines] == ["database ok", "kafka ok", "handlers ok"]
    assert f"command topic {stack.command_topic} exists" in lines[1]

    down = settings.evolve(database_url="mysql+mysqldb://root:secret@127.0.0.1:1/nowhere")
    assert check(down, registry) == 1
    output = capsys.readouterr().out
    assert output.startswith("database FAILED: mysql+mysqldb://root:***@127.0.0.1:1/nowhere: ")
    assert "secret" not in output


def test_healthz_answers_503_naming_each_failing_check() -> None:
    now = [100.0]
    health = Health(stall_seconds=30, clock=lambda: now[0])
    server = HealthServer(0, Metrics("test").registry, health, host="127.0.0.1").start()
    try:
        assert http_get(server.port, "/healthz") == (
            200,
            b'{"status": "ok", "checks": {"consumer": "ok", "database": "ok"}}',
        )
        now[0] = 131.0
        health.database("OperationalError: (2002, connection refused)")
        status, body = http_get(server.port, "/healthz")
        assert (status, json.loads(body)) == (
            503,
            {
                "status": "unhealthy",
                "checks": {
                    "consumer": "poll loop stalled for 31s (limit 30s)",
                    "database": "unreachable: OperationalError: (2002, connection refused)",
                },
            },
        )
        status, metrics = http_get(server.port, "/metrics")
        assert status == 200
        assert b'smw_build_info{version="test"} 1.0' in metrics
        assert http_get(server.port, "/other")[0] == 404
    finally:
        server.stop()


def hold_overlaps(rows: list[Any], lookup: dict[str, str], position: str) -> list[tuple[str, str]]:
    """Pairs of machines whose lock holds on one key overlap, by time or by history row id.

    A hold runs from the machine's `started` row to its terminal row.
    """
    starts = {r.StateMachineID: r for r in rows if r.Event == "started"}
    ends = {r.StateMachineID: r for r in rows if r.ToState in TERMINAL}
    holds: dict[str, list[tuple[Any, Any, str]]] = defaultdict(list)
    for machine_id, began in starts.items():
        holds[lookup[machine_id]].append(
            (getattr(began, position), getattr(ends[machine_id], position), machine_id)
        )
    overlaps = []
    for intervals in holds.values():
        intervals.sort()
        for before, after in itertools.pairwise(intervals):
            if after[0] < before[1]:
                overlaps.append((before[2], after[2]))
    return overlaps


@pytest.mark.timeout(900)
def test_three_workers_share_500_machines_and_never_overlap_on_an_account(
    stack: Stack,
) -> None:
    machines, accounts = 500, 50
    workers = [stack.spawn(f"w{i}", ready=False) for i in range(1, 4)]
    for worker in workers:
        stack.wait_ready(worker)
    stack.wait_for_group(len(workers))

    # Steps sleep 50 ms, so machines of one account meet and many wait for its lock.
    commands = [
        start(f"m{i:03d}-{stack.suffix}", f"acct{i % accounts:02d}-{stack.suffix}", step_sleep=0.05)
        for i in range(machines)
    ]
    began = time.monotonic()
    stack.send(*[(c["lookup_key"], c) for c in commands])
    published = time.monotonic() - began
    table = tables.machine_table(SAGA)
    count = sa.select(sa.func.count()).where(table.c.CurrentState == "completed")

    def completed() -> int:
        with stack.db.connect() as conn:
            return int(conn.execute(count).scalar_one())

    wait_for(
        lambda: f"{machines} completed machines; {completed()} so far",
        lambda: completed() == machines,
        600,
    )
    elapsed = time.monotonic() - began

    lookup = {c["machine_id"]: c["lookup_key"] for c in commands}
    rows = stack.history()
    by_time = hold_overlaps(rows, lookup, "OccurredTimestamp")
    by_commit = hold_overlaps(rows, lookup, "ID")
    started_by = Counter(r.WorkerID.rsplit("-", 1)[0] for r in rows if r.Event == "started")
    dead_letters = sum(
        int(float(line.split()[-1]))
        for worker in workers
        for line in http_get(worker.metrics_port, "/metrics")[1].decode().splitlines()
        if line.startswith("smw_dead_letters_total")
    )
    print(
        f"\nscale-out: {machines} machines over {accounts} accounts, {len(workers)} workers, "
        f"6 partitions: published in {published:.1f}s, all completed in {elapsed:.1f}s "
        f"({machines / elapsed:.1f} machines/s); history rows {len(rows)}; "
        f"started per worker {dict(sorted(started_by.items()))}; "
        f"lock waits {sum(r.Event == 'lock_waiting' for r in rows)}; "
        f"overlaps by time {len(by_time)}, by commit order {len(by_commit)}; "
        f"dead letters {dead_letters}"
    )

    assert Counter(stack.processed_commands()) == Counter(c["command_id"] for c in commands)
    assert Counter(r.StateMachineID for r in rows if r.Event == "created") == Counter(list(lookup))
    assert stack.states() == dict.fromkeys(lookup, "completed")
    assert (by_time, by_commit) == ([], [])
    assert set(started_by) == {"w1", "w2", "w3"}
    assert [worker.stop() for worker in workers] == [0, 0, 0]


def test_sigterm_stops_a_worker_mid_run_and_another_worker_finishes_its_machines(
    stack: Stack,
) -> None:
    first = stack.spawn("w1")
    ids = [f"slow{i:02d}-{stack.suffix}" for i in range(12)]
    stack.send(*[(key(m), start(m, key(m), step_sleep=0.4)) for m in ids])

    def running() -> bool:
        return sum(r.Event == "started" for r in stack.history()) >= 4

    wait_for("four machines to be running", running)
    signalled = time.monotonic()
    assert first.stop(signal.SIGTERM, timeout=LEASE_SECONDS + 30) == 0
    took = time.monotonic() - signalled
    assert took < LEASE_SECONDS + 10
    logged = [e["event"] for e in first.log_events()]
    assert [e for e in logged if e.startswith("worker.")] == [
        "worker.started",
        "worker.stopping",
        "worker.stopped",
    ]
    left = [m for m, state in stack.states(ids).items() if state not in TERMINAL]
    assert left, "the first worker finished everything before it was stopped"

    second = stack.spawn("w2")
    stack.wait_states(dict.fromkeys(ids, "completed"))
    rows: dict[str, list[Any]] = defaultdict(list)
    for row in stack.history():
        rows[row.StateMachineID].append(row)
    assert {m: [r.Sequence for r in found] for m, found in rows.items()} == {
        m: list(range(1, 8)) for m in ids
    }
    assert {m: [r.Event for r in found] for m, found in rows.items()} == dict.fromkeys(
        ids, EXPECTED_EVENTS["plain"]
    )
    workers = {r.WorkerID.rsplit("-", 1)[0] for found in rows.values() for r in found if r.WorkerID}
    assert workers == {"w1", "w2"}
    print(f"\nshutdown: SIGTERM to exit {took:.1f}s; {len(left)} of {len(ids)} left for w2")
    assert second.stop() == 0
