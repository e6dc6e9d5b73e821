"""The physical floor: hand-written SQL on plain MySQLdb connections, one transaction a step.

Per step: UPDATE the machine row (fenced on Version), INSERT one history row, INSERT one
outbox row, COMMIT; four round trips. The rows have the engine's columns and the same JSON,
so the bytes written per step match. Each thread has its own connection and its own machines.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

from bench.cpu import CpuMeter, timed_threads
from bench.database import BenchDatabase
from bench.machines import STEP_NAMES, bench_saga
from worker import tables

EVENT_TOPIC = "statemachine.events"


@dataclass(frozen=True)
class RunResult:
    """What one timed run did: machines and steps finished, wall seconds, extra counts."""

    machines: int
    steps: int
    seconds: float
    statements: int = 0
    commits: int = 0
    pings: int = 0
    row_bytes: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    """CPU seconds used while the clock ran: `bench` (this process), `database`, ..."""

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds if self.seconds else 0.0


def _dump(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def _statements() -> tuple[str, str, str]:
    machine = tables.machine_table(bench_saga.name).name
    update = (
        f"UPDATE `{machine}` SET CurrentState=%s, ResumeFromStep=%s, SerializedState=%s, "
        "UpdatedTimestamp=%s, RetryCount=0, NextRunTimestamp=%s, Version=%s, LeaseOwner=%s, "
        "LeaseExpiresTimestamp=TIMESTAMPADD(MICROSECOND, 30000000, UTC_TIMESTAMP(6)) "
        "WHERE ID=%s AND Version=%s"
    )
    history = (
        f"INSERT INTO `{tables.history.name}` (StateMachineType, StateMachineID, Sequence, "
        "EventID, Event, FromState, ToState, FromStep, ToStep, Handler, InputData, OutputData, "
        "Error, Attempt, DurationMs, WorkerID, CommandID, Actor, Reason, OccurredTimestamp) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, NULL, 1, %s, %s, NULL, NULL, "
        "NULL, %s)"
    )
    outbox = (
        f"INSERT INTO `{tables.outbox.name}` (EventID, Topic, MessageKey, Payload, "
        "CreatedTimestamp) VALUES (%s, %s, %s, %s, %s)"
    )
    return update, history, outbox


def _load(db: BenchDatabase, ids: list[str]) -> dict[str, tuple[str, dict[str, Any], int]]:
    """Each machine's lookup key, data and version, read before the clock starts."""
    table = db.table.name
    rows = db.query(f"SELECT ID, LookupKey, SerializedState, Version FROM `{table}`")
    wanted = set(ids)
    return {r[0]: (r[1], json.loads(r[2])["data"], int(r[3])) for r in rows if r[0] in wanted}


def _run_machines(
    db: BenchDatabase,
    work: list[tuple[str, str, dict[str, Any], int]],
    worker_id: str,
    done: list[int],
    ready: threading.Barrier,
) -> None:
    update, history, outbox = _statements()
    last = len(STEP_NAMES) - 1
    with db.raw() as conn:
        cursor = conn.cursor()
        ready.wait()
        for machine_id, lookup_key, start_data, start_version in work:
            data = dict(start_data)
            version = start_version
            for index, name in enumerate(STEP_NAMES):
                started = time.monotonic()
                before = dict(data)
                data[name] = index + 1
                final = index == last
                state = "completed" if final else "open"
                now = datetime.now(UTC).replace(tzinfo=None)
                sequence = index + 2
                event_id = str(uuid.uuid4())
                serialized = _dump(
                    {
                        "data": data,
                        "engine": {
                            "completed_steps": index + 1,
                            "direction": "forward",
                            "last_error": None,
                            "sequence": sequence,
                        },
                    }
                )
                payload = _dump(
                    {
                        "event_id": event_id,
                        "sequence": sequence,
                        "machine_type": bench_saga.name,
                        "machine_id": machine_id,
                        "lookup_key": lookup_key,
                        "from_state": "open",
                        "to_state": state,
                        "event": "step_succeeded",
                        "step": index if final else index + 1,
                        "handler": name,
                        "data": data,
                        "error": None,
                        "command_id": None,
                        "occurred_at": now.isoformat() + "Z",
                    }
                )
                duration = round((time.monotonic() - started) * 1000, 3)
                cursor.execute(
                    update,
                    (
                        state,
                        index if final else index + 1,
                        serialized,
                        now,
                        None if final else now,
                        version + 1,
                        None if final else worker_id,
                        machine_id,
                        version,
                    ),
                )
                if cursor.rowcount != 1:
                    raise RuntimeError(f"raw: machine {machine_id} was not at version {version}")
                version += 1
                cursor.execute(
                    history,
                    (
                        bench_saga.name,
                        machine_id,
                        sequence,
                        event_id,
                        "step_succeeded",
                        "open",
                        state,
                        index,
                        index if final else index + 1,
                        name,
                        _dump(before),
                        _dump(data),
                        duration,
                        worker_id,
                        now,
                    ),
                )
                cursor.execute(outbox, (event_id, EVENT_TOPIC, machine_id, payload, now))
                conn.commit()
            done.append(1)
        cursor.close()


def run(
    db: BenchDatabase, ids: list[str], concurrency: int, meter: CpuMeter | None = None
) -> RunResult:
    """Run every machine in `ids` through its five steps with `concurrency` threads."""
    meter = meter or CpuMeter()
    loaded = _load(db, ids)
    work = [(machine_id, *loaded[machine_id]) for machine_id in ids]
    done: list[int] = []
    workers = [
        partial(_run_machines, db, work[i::concurrency], f"raw-{i}", done)
        for i in range(concurrency)
    ]
    seconds, cpu = timed_threads(workers, meter)
    steps = len(done) * len(STEP_NAMES)
    return RunResult(
        machines=len(done),
        steps=steps,
        seconds=seconds,
        statements=3 * steps,
        commits=steps,
        row_bytes=db.step_row_bytes(),
        cpu=cpu,
    )
