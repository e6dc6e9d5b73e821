"""The outbox relay: publishes committed transition events, oldest first, at least once.

A transition writes its event to EVENT_OUTBOX in the same transaction. The relay reads the
unpublished rows in ID order, publishes them, waits for Kafka to acknowledge every one and
only then marks them published, all inside one transaction that holds the EVENT_OUTBOX_RELAY
row lock. Only the relay holding that lock publishes, so a machine's events leave in the
order they were committed; a failed delivery rolls the marks back and the rows go again.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import Connection, delete, func, select, update

from worker import tables
from worker.kafka_io import EventSink
from worker.records import naive, utc
from worker.store import Store

RELAY_NAME = "relay"


class Backlog(NamedTuple):
    events: int
    oldest_age_seconds: float


class OutboxRelay:
    """Moves EVENT_OUTBOX rows to their topics through an EventSink."""

    def __init__(
        self,
        store: Store,
        sink: EventSink,
        *,
        batch_size: int = 500,
        retention_seconds: float = 600.0,
        prune_batch: int = 1000,
        flush_timeout: float = 30.0,
    ) -> None:
        self.store = store
        self.sink = sink
        self.batch_size = batch_size
        self.retention_seconds = retention_seconds
        self.prune_batch = prune_batch
        self.flush_timeout = flush_timeout
        self.busy_elsewhere = False
        """Whether the last `publish_batch` found another relay holding the lock."""

    def publish_batch(self) -> int:
        """Publish up to `batch_size` events; 0 if none are waiting or another relay is busy.

        Raises PublishError (nothing marked) if Kafka refused any of them.
        """
        return self.store.run(self._publish)

    def _publish(self, conn: Connection) -> int:
        relay = tables.outbox_relay
        holder = conn.execute(
            select(relay.c.Name).where(relay.c.Name == RELAY_NAME).with_for_update(skip_locked=True)
        ).first()
        self.busy_elsewhere = holder is None
        if holder is None:
            return 0
        o = tables.outbox
        rows = conn.execute(
            select(o.c.ID, o.c.Topic, o.c.MessageKey, o.c.Payload)
            .where(o.c.PublishedTimestamp.is_(None))
            .order_by(o.c.ID)
            .limit(self.batch_size)
        ).all()
        if not rows:
            return 0
        for row in rows:
            self.sink.publish(row.Topic, row.MessageKey, row.Payload.encode("utf-8"))
        self.sink.flush(self.flush_timeout)
        conn.execute(
            update(o)
            .where(o.c.ID.in_([row.ID for row in rows]))
            .values(PublishedTimestamp=tables.utc_now())
        )
        return len(rows)

    def prune_published(self) -> int:
        """Delete events published more than `retention_seconds` ago, in batches."""
        cutoff = naive(self.store.db_now() - timedelta(seconds=self.retention_seconds))
        total = 0
        while True:
            deleted = self.store.run(lambda conn: self._prune(conn, cutoff))
            total += deleted
            if deleted < self.prune_batch:
                return total

    def _prune(self, conn: Connection, cutoff: datetime | None) -> int:
        o = tables.outbox
        ids = (
            conn.execute(
                select(o.c.ID)
                .where(o.c.PublishedTimestamp.is_not(None), o.c.PublishedTimestamp < cutoff)
                .order_by(o.c.ID)
                .limit(self.prune_batch)
            )
            .scalars()
            .all()
        )
        if ids:
            conn.execute(delete(o).where(o.c.ID.in_(ids)))
        return len(ids)

    def backlog(self) -> Backlog:
        """How many events wait to be published, and how old the oldest is (database clock)."""
        o = tables.outbox

        def work(conn: Connection) -> Backlog:
            count, oldest, now = conn.execute(
                select(func.count(o.c.ID), func.min(o.c.CreatedTimestamp), tables.utc_now()).where(
                    o.c.PublishedTimestamp.is_(None)
                )
            ).one()
            return Backlog(int(count), age_seconds(_as_utc(oldest), _as_utc(now)))

        return self.store.run(work)


def age_seconds(oldest: datetime | None, now: datetime | None) -> float:
    if oldest is None or now is None:
        return 0.0
    return max(0.0, (now - oldest).total_seconds())


def _as_utc(value: Any) -> datetime | None:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return utc(value)
