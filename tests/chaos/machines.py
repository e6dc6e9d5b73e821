"""The chaos machine type, loaded by the workers with `SMW_HANDLERS=tests.chaos.machines`.

`chaos_saga` is an order saga in shape: five steps with compensations and a local lock on
the lookup key (the account). Its event topic is the worker's --event-topic, unique per run.

Every forward and backward action records each of its executions in CHAOS_STEP_RUN through
a database connection of its own, committed before the action returns: which machine, step,
direction and attempt, which worker process, and when it began and ended by the database
clock. The harness counts executions per step from it, and checks from its intervals that no
two machines of one account ever ran at the same time.

The machine's start data scripts its path, so the harness knows the outcome to expect:

- `"sleep": s`                        every action sleeps s seconds after recording its start;
- `"fail_at": i, "failures": n`       step i's forward raises on attempts 1..n (retry path;
                                      more failures than the retry policy allows: failed);
- `"rollback_at": i`                  step i's forward asks for a rollback;
- `"comp_fail_at": i, "comp_failures": n`  step i's backward raises on attempts 1..n.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    insert,
    update,
)
from sqlalchemy.engine import make_url

from worker import LockPolicy, MachineType, RetryPolicy, Rollback, Step, StepContext, tables
from worker.definition import Direction

TYPE_NAME = "chaos_saga"
STEPS = 5
MAX_ATTEMPTS = 10
"""Generous: a step that fails because the database is restarting uses attempts too."""

run_metadata = MetaData()
step_run = Table(
    "CHAOS_STEP_RUN",
    run_metadata,
    Column("ID", BigInteger, primary_key=True, autoincrement=True),
    Column("MachineID", String(128), nullable=False),
    Column("LookupKey", String(191), nullable=False),
    Column("Step", Integer, nullable=False),
    Column("Direction", String(16), nullable=False),
    Column("Attempt", Integer, nullable=False),
    Column("Pid", Integer, nullable=False),
    Column("StartedAt", tables.Timestamp, nullable=False),
    Column("EndedAt", tables.Timestamp, nullable=True),
    Index("ix_chaos_step_run_machine", "MachineID", "Step"),
)

_engine: Engine | None = None
_engine_lock = threading.Lock()


def recorder_engine() -> Engine:
    """This process's own engine for CHAOS_STEP_RUN, from the worker's SMW_DATABASE_URL."""
    global _engine  # noqa: PLW0603  # one engine per worker process, made on first use
    with _engine_lock:
        if _engine is None:
            url = make_url(os.environ["SMW_DATABASE_URL"])
            password = os.environ.get("SMW_DATABASE_PASSWORD")
            if password:
                url = url.set(password=password)
            _engine = create_engine(
                url,
                isolation_level="READ COMMITTED",
                pool_pre_ping=True,
                pool_size=4,
                max_overflow=8,
                connect_args={"connect_timeout": 5},
            )
        return _engine


def record_start(ctx: StepContext) -> int:
    """Insert this execution's row (committed) and return its id."""
    with recorder_engine().begin() as conn:
        result = conn.execute(
            insert(step_run).values(
                MachineID=ctx.machine_id,
                LookupKey=ctx.lookup_key,
                Step=ctx.step_index,
                Direction=ctx.direction.value,
                Attempt=ctx.attempt,
                Pid=os.getpid(),
                StartedAt=tables.utc_now(),
            )
        )
        key = result.inserted_primary_key
        assert key is not None
        return int(key[0])


def record_end(run_id: int) -> None:
    with recorder_engine().begin() as conn:
        conn.execute(
            update(step_run).where(step_run.c.ID == run_id).values(EndedAt=tables.utc_now())
        )


class ChaosStep(Step):
    """Step `index` of the saga; what it does is scripted by the machine's data."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.name = f"step{index}"

    def forward(self, ctx: StepContext) -> Rollback | dict[str, Any]:
        run_id = record_start(ctx)
        time.sleep(float(ctx.data.get("sleep", 0)))
        record_end(run_id)
        if ctx.data.get("fail_at") == self.index and ctx.attempt <= int(
            ctx.data.get("failures", 0)
        ):
            raise ConnectionError(f"{self.name}: scripted failure on attempt {ctx.attempt}")
        if ctx.data.get("rollback_at") == self.index:
            return Rollback(reason=f"{self.name}: scripted rollback")
        return {self.name: "done"}

    def backward(self, ctx: StepContext) -> dict[str, Any]:
        run_id = record_start(ctx)
        time.sleep(float(ctx.data.get("sleep", 0)))
        record_end(run_id)
        if ctx.data.get("comp_fail_at") == self.index and ctx.attempt <= int(
            ctx.data.get("comp_failures", 0)
        ):
            raise ConnectionError(f"{self.name}: scripted compensation failure")
        return {self.name: "compensated"}


chaos_saga = MachineType(
    name=TYPE_NAME,
    steps=tuple(ChaosStep(index) for index in range(STEPS)),
    lock_policy=LockPolicy.LOCAL,
    retry=RetryPolicy(base_delay=0.1, max_delay=1.0, max_attempts=MAX_ATTEMPTS, jitter=0.1),
)


# -- what a script leads to ----------------------------------------------------------------


def expected_state(data: dict[str, Any]) -> str:
    """The terminal state a machine started with `data` must reach."""
    if data.get("fail_at") is not None and int(data.get("failures", 0)) >= MAX_ATTEMPTS:
        return "failed"
    if data.get("rollback_at") is not None:
        return "rollback_completed"
    return "completed"


def expected_path(data: dict[str, Any]) -> list[tuple[str, str | None]]:
    """The (event, handler) skeleton of the history: steps done, rollback, compensations.

    Lock waits, retries and `created`/`started` vary with timing and are not part of it.
    """
    fail_at = data.get("fail_at")
    gives_up = fail_at is not None and int(data.get("failures", 0)) >= MAX_ATTEMPTS
    rollback_at = data.get("rollback_at")
    path: list[tuple[str, str | None]] = []
    for index in range(STEPS):
        if gives_up and index == fail_at:
            path.append(("step_failed", f"step{index}"))
            return path
        if index == rollback_at:
            path.append(("rollback_started", f"step{index}"))
            path.extend(("step_compensated", f"step{back}") for back in range(index - 1, -1, -1))
            return path
        path.append(("step_succeeded", f"step{index}"))
    return path


PATH_EVENTS = frozenset({"step_succeeded", "step_failed", "rollback_started", "step_compensated"})


def direction_of(from_state: str) -> str:
    """The direction of the action whose outcome a history row records."""
    return Direction.BACKWARD.value if from_state == "rollback" else Direction.FORWARD.value
