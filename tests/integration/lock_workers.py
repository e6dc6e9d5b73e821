"""Machine types and worker processes for the multi-process lock tests.

Each machine's steps record the interval during which the machine ran while holding its
locks into the side table LOCK_HOLD (StartedAt/EndedAt from the database clock), through a
connection of their own, so that the test can check that no two holders ever overlapped.

Run as a process, from the repository root:

- `python -m tests.integration.lock_workers contend URL WORKER_ID RESULT_PATH MAX_SECONDS
  RECHECK_SECONDS` runs an engine until no machine of the lock types is left unfinished,
  then writes what it counted (claims, start attempts, waits) to RESULT_PATH as JSON.
- `python -m tests.integration.lock_workers slow URL MACHINE_TYPE MACHINE_ID STEP_SLEEP`
  runs one machine with a 3 s lease; its step sleeps STEP_SLEEP seconds once it has recorded
  its LOCK_HOLD row (the test's signal that the step is running), so the test can kill it.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from sqlalchemy import Column, MetaData, String, Table, create_engine, insert, update
from sqlalchemy.dialects import mysql
from sqlalchemy.types import BigInteger, DateTime, Integer

from worker import tables
from worker.decisions import Decision, Happening
from worker.definition import LockPolicy, MachineType, Registry, Step, StepContext
from worker.engine import Engine
from worker.errors import StoreUnavailableError
from worker.hooks import Hooks
from worker.records import Machine
from worker.states import TERMINAL, State
from worker.store import Store

LOCAL_A = "lk_local_a"
LOCAL_B = "lk_local_b"
GLOBAL = "lk_global"
BOTH = "lk_both"
POLICIES: dict[str, LockPolicy] = {
    LOCAL_A: LockPolicy.LOCAL,
    LOCAL_B: LockPolicy.LOCAL,
    GLOBAL: LockPolicy.GLOBAL,
    BOTH: LockPolicy.BOTH,
}
SLOW_LEASE_SECONDS = 3.0

hold_metadata = MetaData()
lock_hold = Table(
    "LOCK_HOLD",
    hold_metadata,
    Column("ID", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True),
    Column("LookupKey", String(191), nullable=False),
    Column("MachineType", String(48), nullable=False),
    Column("MachineID", String(128), nullable=False),
    Column("Scope", String(16), nullable=False),
    Column("StartedAt", DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")),
    Column("EndedAt", DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")),
)


class HoldRecorder:
    """Writes a machine's hold interval to LOCK_HOLD, each write committed on its own."""

    def __init__(self, url: str, *, step_sleep: float = 0.0) -> None:
        self.engine = create_engine(url, pool_size=2, max_overflow=2)
        self.step_sleep = step_sleep

    def create_table(self) -> None:
        hold_metadata.create_all(self.engine)

    def begin(self, ctx: StepContext) -> int:
        with self.engine.begin() as conn:
            result = conn.execute(
                insert(lock_hold).values(
                    LookupKey=ctx.lookup_key,
                    MachineType=ctx.machine_type,
                    MachineID=ctx.machine_id,
                    Scope=POLICIES[ctx.machine_type].value,
                    StartedAt=tables.utc_now(),
                )
            )
            return int(result.inserted_primary_key[0])

    def end(self, hold_id: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(lock_hold).where(lock_hold.c.ID == hold_id).values(EndedAt=tables.utc_now())
            )

    def pause(self) -> None:
        time.sleep(self.step_sleep or random.uniform(0.001, 0.005))


class Hold(Step):
    """The only step of a one-step type: the whole hold happens inside it."""

    name = "hold"

    def __init__(self, recorder: HoldRecorder) -> None:
        self.recorder = recorder

    def forward(self, ctx: StepContext) -> dict[str, Any]:
        hold_id = self.recorder.begin(ctx)
        self.recorder.pause()
        self.recorder.end(hold_id)
        return {"hold_id": hold_id}


class Enter(Step):
    """First of two steps: the hold begins here and carries its row id in the data."""

    name = "enter"

    def __init__(self, recorder: HoldRecorder) -> None:
        self.recorder = recorder

    def forward(self, ctx: StepContext) -> dict[str, Any]:
        hold_id = self.recorder.begin(ctx)
        self.recorder.pause()
        return {"hold_id": hold_id}


class Leave(Step):
    """Second of two steps: the hold ends just before the machine completes."""

    name = "leave"

    def __init__(self, recorder: HoldRecorder) -> None:
        self.recorder = recorder

    def forward(self, ctx: StepContext) -> None:
        self.recorder.pause()
        self.recorder.end(int(ctx.data["hold_id"]))


def machine_types(recorder: HoldRecorder) -> tuple[MachineType, ...]:
    """Local (one and two steps), global (one step) and both (two steps)."""
    return (
        MachineType(LOCAL_A, (Hold(recorder),), lock_policy=LockPolicy.LOCAL),
        MachineType(LOCAL_B, (Enter(recorder), Leave(recorder)), lock_policy=LockPolicy.LOCAL),
        MachineType(GLOBAL, (Hold(recorder),), lock_policy=LockPolicy.GLOBAL),
        MachineType(BOTH, (Enter(recorder), Leave(recorder)), lock_policy=LockPolicy.BOTH),
    )


def build_store(url: str, *, step_sleep: float = 0.0) -> tuple[Store, HoldRecorder]:
    recorder = HoldRecorder(url, step_sleep=step_sleep)
    return Store(url, Registry(machine_types(recorder))), recorder


class Counting(Hooks):
    def __init__(self, counts: Counter[str]) -> None:
        self.counts = counts

    def stale_write(self, machine_type: str, machine_id: str) -> None:
        del machine_type, machine_id
        self.counts["stale_writes"] += 1


def count_starts(store: Store, counts: Counter[str]) -> None:
    """Wrap `store.start` so every lock acquisition attempt and its result is counted."""
    original = store.start

    def start(*args: Any, **kwargs: Any) -> tuple[Machine, Decision]:
        machine, decision = original(*args, **kwargs)
        counts["start_attempts"] += 1
        if machine.state is State.OPEN:
            counts["acquired"] += 1
        elif decision.history:
            counts["began_waiting"] += 1
        else:
            counts["rechecked_still_blocked"] += 1
        return machine, decision

    store.start = start  # type: ignore[method-assign]


def unfinished(store: Store) -> int:
    terminal = {s.value for s in TERMINAL}
    return sum(
        n
        for name in store.registry
        for state, n in store.count_by_state(name).items()
        if state not in terminal
    )


def contend(
    url: str, worker_id: str, result_path: Path, max_seconds: float, recheck_seconds: float
) -> None:
    store, recorder = build_store(url)
    counts: Counter[str] = Counter()
    count_starts(store, counts)
    engine = Engine(
        store,
        worker_id=worker_id,
        lock_recheck_seconds=recheck_seconds,
        hooks=Counting(counts),
    )
    began = time.monotonic()
    while time.monotonic() - began < max_seconds:
        try:
            ran = engine.run_due(limit=4)
        except StoreUnavailableError:
            counts["store_errors"] += 1
            continue
        counts["claimed"] += ran
        if ran:
            continue
        if unfinished(store) == 0:
            counts["finished"] = 1
            break
        counts["idle_polls"] += 1
        time.sleep(0.01)
    counts["seconds_ms"] = round((time.monotonic() - began) * 1000)
    result_path.write_text(json.dumps({"worker": worker_id, **counts}))
    store.engine.dispose()
    recorder.engine.dispose()


def run_slow(url: str, machine_type: str, machine_id: str, step_sleep: float) -> None:
    store, _ = build_store(url, step_sleep=step_sleep)
    engine = Engine(store, worker_id="doomed", lease_seconds=SLOW_LEASE_SECONDS)
    engine.run_one(machine_type, machine_id)


def at_now(store: Store, worker_id: str = "test") -> Happening:
    return Happening(now=store.db_now(), worker_id=worker_id)


def main(argv: list[str]) -> None:
    mode, url, *rest = argv
    if mode == "contend":
        worker_id, result_path, max_seconds, recheck_seconds = rest
        contend(url, worker_id, Path(result_path), float(max_seconds), float(recheck_seconds))
    elif mode == "slow":
        machine_type, machine_id, step_sleep = rest
        run_slow(url, machine_type, machine_id, float(step_sleep))
    else:
        raise SystemExit(f"unknown mode {mode!r}; expected contend or slow")


if __name__ == "__main__":
    main(sys.argv[1:])
