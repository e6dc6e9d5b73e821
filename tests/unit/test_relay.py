"""The outbox relay on SQLite with the in-memory sink: order, marking, failure and pruning."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Connection, insert, select, update

from worker import tables
from worker.commands import apply_command
from worker.definition import Registry
from worker.engine import Engine
from worker.kafka_io import MemorySink, Published, PublishError
from worker.messages import Command, CommandName, validate_event
from worker.records import naive
from worker.relay import Backlog, OutboxRelay
from worker.store import Store

pytestmark = pytest.mark.unit


@pytest.fixture
def store() -> Store:
    store = Store("sqlite://", Registry.from_modules(["handlers"]))
    store.ensure_schema()
    return store


def add_events(store: Store, *rows: tuple[str, str, dict[str, Any]]) -> None:
    """Outbox rows as a transition would write them: (topic, key, payload)."""
    now = naive(store.db_now())
    store.run(
        lambda conn: conn.execute(
            insert(tables.outbox),
            [
                {
                    "EventID": f"event-{index}",
                    "Topic": topic,
                    "MessageKey": key,
                    "Payload": json.dumps(payload),
                    "CreatedTimestamp": now,
                }
                for index, (topic, key, payload) in enumerate(rows)
            ],
        )
    )


def outbox(store: Store) -> list[tuple[str, bool]]:
    o = tables.outbox
    with store.engine.connect() as conn:
        rows = conn.execute(select(o.c.EventID, o.c.PublishedTimestamp).order_by(o.c.ID))
        return [(event_id, published is not None) for event_id, published in rows]


def published_at(store: Store, event_id: str, when: datetime | None) -> None:
    o = tables.outbox

    def work(conn: Connection) -> None:
        conn.execute(
            update(o).where(o.c.EventID == event_id).values(PublishedTimestamp=naive(when))
        )

    store.run(work)


def test_publishes_unpublished_events_in_id_order_and_marks_them(store: Store) -> None:
    add_events(store, ("a", "m1", {"n": 1}), ("b", "m2", {"n": 2}), ("a", "m1", {"n": 3}))
    sink = MemorySink()
    relay = OutboxRelay(store, sink)

    assert relay.publish_batch() == 3
    assert sink.published == [
        Published("a", "m1", b'{"n": 1}'),
        Published("b", "m2", b'{"n": 2}'),
        Published("a", "m1", b'{"n": 3}'),
    ]
    assert outbox(store) == [("event-0", True), ("event-1", True), ("event-2", True)]
    assert relay.publish_batch() == 0
    assert len(sink.published) == 3


def test_a_batch_holds_at_most_batch_size_events(store: Store) -> None:
    add_events(store, *[("t", f"m{i}", {"n": i}) for i in range(5)])
    sink = MemorySink()
    relay = OutboxRelay(store, sink, batch_size=2)

    assert [relay.publish_batch() for _ in range(4)] == [2, 2, 1, 0]
    assert [p.key for p in sink.published] == ["m0", "m1", "m2", "m3", "m4"]


def test_a_failed_delivery_leaves_every_event_of_the_batch_unpublished(store: Store) -> None:
    add_events(store, ("t", "m1", {"n": 1}), ("t", "m2", {"n": 2}))
    sink = MemorySink()
    sink.failure = "broker unreachable"
    relay = OutboxRelay(store, sink)

    with pytest.raises(PublishError, match="broker unreachable"):
        relay.publish_batch()
    assert outbox(store) == [("event-0", False), ("event-1", False)]
    assert sink.published == []

    sink.failure = None
    assert relay.publish_batch() == 2
    assert [p.key for p in sink.published] == ["m1", "m2"]
    assert outbox(store) == [("event-0", True), ("event-1", True)]


def test_prune_deletes_only_events_published_before_the_retention(store: Store) -> None:
    add_events(store, *[("t", f"m{i}", {}) for i in range(4)])
    now = store.db_now()
    published_at(store, "event-0", now - timedelta(seconds=700))
    published_at(store, "event-1", now - timedelta(seconds=650))
    published_at(store, "event-2", now - timedelta(seconds=30))
    relay = OutboxRelay(store, MemorySink(), retention_seconds=600, prune_batch=1)

    assert relay.prune_published() == 2
    assert outbox(store) == [("event-2", True), ("event-3", False)]


def test_backlog_counts_unpublished_events_and_ages_the_oldest(store: Store) -> None:
    relay = OutboxRelay(store, MemorySink())
    assert relay.backlog() == Backlog(0, 0.0)

    add_events(store, ("t", "m1", {}), ("t", "m2", {}))
    o = tables.outbox
    old = naive(store.db_now() - timedelta(seconds=120))
    store.run(
        lambda conn: conn.execute(
            update(o).where(o.c.EventID == "event-0").values(CreatedTimestamp=old)
        )
    )
    backlog = relay.backlog()
    assert backlog.events == 2
    assert 120 <= backlog.oldest_age_seconds < 130

    relay.publish_batch()
    assert relay.backlog() == Backlog(0, 0.0)


def test_an_engine_run_reaches_the_sink_once_per_transition_in_sequence_order(
    store: Store,
) -> None:
    for index, data in enumerate([{}, {"payment_failures": 1}, {"address_invalid": True}]):
        command = Command(
            command_id=f"c{index}",
            command=CommandName.START,
            machine_type="order_saga",
            machine_id=f"order-{index}",
            lookup_key=f"customer-{index}",
            data=data,
        )
        apply_command(store, command)
    Engine(store, worker_id="w").run_until_idle(wait_for_timers=True, max_wait=30)
    sink = MemorySink()

    assert OutboxRelay(store, sink).publish_batch() > 0
    events: dict[str, list[dict[str, Any]]] = {}
    for message in sink.published:
        assert message.topic == "orders.events"
        event = json.loads(message.value or b"")
        validate_event(event)
        assert message.key == event["machine_id"]
        events.setdefault(event["machine_id"], []).append(event)
    for machine_id, found in events.items():
        history = store.history("order_saga", machine_id)
        assert [(e["event_id"], e["sequence"]) for e in found] == [
            (h.event_id, h.sequence) for h in history
        ]
        assert [e["sequence"] for e in found] == list(range(1, len(history) + 1))
    assert {m: events[m][-1]["to_state"] for m in events} == {
        "order-0": "completed",
        "order-1": "completed",
        "order-2": "rollback_completed",
    }
