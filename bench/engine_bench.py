"""The library in process: Engine threads claim and run pre-created machines to completion.

Statements, commits and connection checkouts are counted with SQLAlchemy events on the
Store's engine while the clock runs, so round trips per step are measured, not estimated.
"""

from __future__ import annotations

import threading
from functools import partial
from typing import Any

from sqlalchemy import event
from sqlalchemy.pool import PoolResetState
from sqlalchemy.pool.base import reset_rollback

from bench.cpu import CpuMeter, timed_threads
from bench.database import BenchDatabase
from bench.machines import STEPS
from bench.raw import RunResult
from worker.engine import Engine
from worker.store import Store


class RoundTrips:
    """Counts what the driver sends: statements, commits, rollbacks (the Connection's and the
    pool's reset on return) and pre-ping pings (one per checkout)."""

    def __init__(self, store: Store) -> None:
        self._lock = threading.Lock()
        self.counting = False
        self.statements = 0
        self.commits = 0
        self.rollbacks = 0
        self.checkouts = 0
        self.pool_rollbacks = 0
        engine = store.engine
        self.pre_ping = bool(getattr(engine.pool, "_pre_ping", False))
        self._rolls_back_on_return = engine.pool._reset_on_return is reset_rollback
        event.listen(engine, "before_cursor_execute", self._statement)
        event.listen(engine, "commit", self._commit)
        event.listen(engine, "rollback", self._rollback)
        event.listen(engine.pool, "checkout", self._checkout)
        event.listen(engine.pool, "reset", self._reset)

    def _bump(self, name: str) -> None:
        if self.counting:
            with self._lock:
                setattr(self, name, getattr(self, name) + 1)

    def _statement(self, *args: Any) -> None:
        del args
        self._bump("statements")

    def _commit(self, *args: Any) -> None:
        del args
        self._bump("commits")

    def _rollback(self, *args: Any) -> None:
        del args
        self._bump("rollbacks")

    def _checkout(self, *args: Any) -> None:
        del args
        self._bump("checkouts")

    def _reset(self, dbapi_connection: Any, record: Any, state: PoolResetState) -> None:
        """The pool's own ROLLBACK when a connection comes back (SQLAlchemy skips it only
        when the Connection itself just rolled back)."""
        del dbapi_connection, record
        if self._rolls_back_on_return and state.asyncio_safe and not state.transaction_was_reset:
            self._bump("pool_rollbacks")

    @property
    def pings(self) -> int:
        """A pre-ping pool pings the server once per checkout."""
        return self.checkouts if self.pre_ping else 0

    @property
    def total(self) -> int:
        return self.statements + self.commits + self.rollbacks + self.pool_rollbacks + self.pings


def _warm(store: Store, connections: int) -> None:
    """Open the pool's connections before the clock starts."""
    held = [store.engine.connect() for _ in range(connections)]
    for conn in held:
        conn.close()


def run(
    db: BenchDatabase,
    ids: list[str],
    concurrency: int,
    *,
    claim_limit: int = 4,
    meter: CpuMeter | None = None,
) -> tuple[RunResult, RoundTrips]:
    """Run `len(ids)` pre-created machines with `concurrency` threads, each with an Engine."""
    meter = meter or CpuMeter()
    store = db.store()
    counts = RoundTrips(store)
    _warm(store, concurrency)
    target_count = len(ids)

    def loop(number: int, ready: threading.Barrier) -> None:
        # Each machine runs to completion once claimed, so a thread that finds nothing due
        # is done: whatever is left is leased by the other threads.
        engine = Engine(store, worker_id=f"bench-{number}")
        ready.wait()
        while engine.run_due(limit=claim_limit):
            pass

    def start_counting() -> None:
        counts.counting = True

    try:
        seconds, cpu = timed_threads(
            [partial(loop, i) for i in range(concurrency)], meter, on_start=start_counting
        )
    finally:
        counts.counting = False
        store.engine.dispose()
    completed = db.count_state("completed")
    if completed != target_count:
        raise RuntimeError(f"engine: {completed} of {target_count} machines completed")
    steps = completed * STEPS
    return (
        RunResult(
            machines=completed,
            steps=steps,
            seconds=seconds,
            statements=counts.statements,
            commits=counts.commits,
            pings=counts.pings,
            row_bytes=db.step_row_bytes(),
            cpu=cpu,
        ),
        counts,
    )
