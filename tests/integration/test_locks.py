"""Business locks on a real MariaDB/MySQL: many processes, crashes, type locks, operators.

The machine types come from `tests/integration/lock_workers.py`; their steps record when
each machine held its locks into LOCK_HOLD, so overlaps between holders can be measured.
"""

from __future__ import annotations

import itertools
import json
import random
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from tests.conftest import ROOT
from tests.integration.lock_workers import (
    BOTH,
    GLOBAL,
    LOCAL_A,
    LOCAL_B,
    POLICIES,
    SLOW_LEASE_SECONDS,
    build_store,
    lock_hold,
)
from worker import decisions, locks, tables
from worker.decisions import Happening
from worker.engine import Engine
from worker.errors import StaleWriteError, TypeRejectedError, WorkerError
from worker.locks import HeldLock, TypeLockKind
from worker.outcomes import Success
from worker.records import Machine, utc
from worker.states import State
from worker.store import Claimed, Store

pytestmark = pytest.mark.integration

PROCESSES = 8
MACHINES = 800
KEYS = 30
TYPE_WEIGHTS = {LOCAL_A: 35, LOCAL_B: 35, GLOBAL: 15, BOTH: 15}
WORKER_MAX_SECONDS = 100.0
RECHECK_SECONDS = 600.0
"""Longer than the run: every waiter must be started by a wake-up, none by its recheck timer."""
STEPS = {LOCAL_A: 1, LOCAL_B: 2, GLOBAL: 1, BOTH: 2}


@pytest.fixture
def lock_store(fresh_mysql_url: str) -> Iterator[Store]:
    store, recorder = build_store(fresh_mysql_url)
    store.ensure_schema()
    recorder.create_table()
    yield store
    store.engine.dispose()
    recorder.engine.dispose()


def create(store: Store, machine_type: str, machine_id: str, key: str) -> Machine:
    definition = store.registry.get_type(machine_type)
    at = Happening(now=store.db_now(), worker_id="test")
    return store.create_machine(decisions.create(definition, machine_id, key, {}, at))


def hold(store: Store, machine_type: str, machine_id: str, worker_id: str = "holder") -> Machine:
    """Claim the machine and take its locks, but run no step: it holds them until `finish`."""
    (claimed,) = store.claim(machine_type, worker_id, 60, machine_id=machine_id)
    definition = store.registry.get_type(machine_type)
    at = Happening(now=claimed.db_now, worker_id=worker_id)
    opened, _ = store.start(claimed.machine, definition, at, lease_seconds=60)
    assert (opened.state, opened.lease_owner) == (State.OPEN, worker_id)
    return opened


def finish(store: Store, held: Machine) -> Machine:
    """Run a machine taken by `hold` to its end, as the worker holding its lease."""
    assert held.lease_owner is not None
    engine = Engine(store, worker_id=held.lease_owner, lease_seconds=60)
    return engine.run_claimed(Claimed(held, store.db_now()))


def events(store: Store, machine_type: str, machine_id: str) -> list[str]:
    return [h.event for h in store.history(machine_type, machine_id)]


def waiting_reasons(store: Store, machine_type: str, machine_id: str) -> list[str | None]:
    return [h.reason for h in store.history(machine_type, machine_id) if h.event == "lock_waiting"]


def state(store: Store, machine_type: str, machine_id: str) -> State:
    return store.load(machine_type, machine_id).state


def completed_events(machine_type: str, *, waited: bool) -> list[str]:
    return [
        "created",
        *(["lock_waiting"] if waited else []),
        "started",
        *["step_succeeded"] * STEPS[machine_type],
    ]


def conflicts(type_a: str, type_b: str) -> bool:
    """Global locks exclude everything on the key; local locks exclude their own type."""
    return POLICIES[type_a].uses_global or POLICIES[type_b].uses_global or type_a == type_b


@dataclass(frozen=True)
class Interval:
    machine_type: str
    machine_id: str
    start: datetime
    end: datetime


def overlapping_conflicts(intervals: list[Interval]) -> list[tuple[Interval, Interval]]:
    ordered = sorted(intervals, key=lambda i: i.start)
    found = []
    for i, a in enumerate(ordered):
        for b in ordered[i + 1 :]:
            if b.start >= a.end:
                continue
            if conflicts(a.machine_type, b.machine_type):
                found.append((a, b))
    return found


def max_concurrency(intervals: list[Interval]) -> int:
    points = sorted(
        [(i.start, 1) for i in intervals] + [(i.end, -1) for i in intervals],
        key=lambda p: (p[0], p[1]),
    )
    running = peak = 0
    for _, delta in points:
        running += delta
        peak = max(peak, running)
    return peak


# -- a. many processes -------------------------------------------------------------------------


def test_many_processes_never_give_a_lock_two_holders_and_every_waiter_runs(
    lock_store: Store, tmp_path: Path
) -> None:
    """8 processes race over 30 keys: no conflicting holds overlap, FIFO holds, all complete.

    Each process runs `Engine.run_due` until nothing is left. Hold intervals are checked twice:
    from history (the `started` row to the terminal row) and from the step's own LOCK_HOLD
    row. Global conflicts with anything on the key; local with the same type on the key.
    Conflicting machines on a key take their locks in creation order.
    """
    store = lock_store
    url = store.engine.url.render_as_string(hide_password=False)
    rng = random.Random(1729)
    names = list(TYPE_WEIGHTS)
    planned = [
        (
            rng.choices(names, weights=list(TYPE_WEIGHTS.values()))[0],
            f"m{n:05d}",
            f"k{n % KEYS:02d}",
        )
        for n in range(MACHINES)
    ]
    rng.shuffle(planned)
    setup_began = time.monotonic()
    with ThreadPoolExecutor(PROCESSES) as pool:
        list(pool.map(lambda plan: create(store, *plan), planned))
    setup_seconds = time.monotonic() - setup_began

    began = time.monotonic()
    workers = []
    for n in range(PROCESSES):
        log = (tmp_path / f"p{n}.log").open("w")
        workers.append(
            (
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "tests.integration.lock_workers",
                        "contend",
                        url,
                        f"p{n}",
                        str(tmp_path / f"p{n}.json"),
                        str(WORKER_MAX_SECONDS),
                        str(RECHECK_SECONDS),
                    ],
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ),
                log,
            )
        )
    for process, log in workers:
        try:
            process.wait(timeout=WORKER_MAX_SECONDS + 30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            log.close()
    wall = time.monotonic() - began
    logs = "".join((tmp_path / f"p{n}.log").read_text()[-2000:] for n in range(PROCESSES))
    assert [p.returncode for p, _ in workers] == [0] * PROCESSES, logs
    results = [json.loads((tmp_path / f"p{n}.json").read_text()) for n in range(PROCESSES)]
    totals: Counter[str] = Counter()
    for result in results:
        totals.update({k: v for k, v in result.items() if isinstance(v, int)})

    planned_types = Counter(t for t, _, _ in planned)
    for machine_type, count in planned_types.items():
        assert store.count_by_state(machine_type) == {"completed": count}, dict(totals)
    assert totals["finished"] == PROCESSES
    assert totals["stale_writes"] == 0
    assert totals["claimed"] == totals["start_attempts"]

    h = tables.history
    with store.engine.connect() as conn:
        history = conn.execute(
            select(
                h.c.StateMachineType,
                h.c.StateMachineID,
                h.c.Sequence,
                h.c.Event,
                h.c.ToState,
                h.c.OccurredTimestamp,
            ).order_by(h.c.StateMachineType, h.c.StateMachineID, h.c.Sequence)
        ).all()
        holds = conn.execute(select(lock_hold)).all()
        created = {
            (machine_type, r.ID): (r.CreatedTimestamp, r.ID)
            for machine_type in names
            for r in conn.execute(
                select(store.table(machine_type).c.ID, store.table(machine_type).c.CreatedTimestamp)
            )
        }
        still_held = locks.held_locks(conn, store.registry)
    keys = {(t, m): k for t, m, k in planned}

    by_machine: dict[tuple[str, str], list[tuple[str, str, datetime]]] = defaultdict(list)
    for row in history:
        by_machine[(row.StateMachineType, row.StateMachineID)].append(
            (row.Event, row.ToState, row.OccurredTimestamp)
        )
    assert len(by_machine) == MACHINES
    waited = 0
    history_intervals: dict[str, list[Interval]] = defaultdict(list)
    for (machine_type, machine_id), rows in by_machine.items():
        seen = [event for event, _, _ in rows]
        times = [at for _, _, at in rows]
        assert times == sorted(times), (machine_id, rows)
        did_wait = "lock_waiting" in seen
        waited += did_wait
        assert seen == completed_events(machine_type, waited=did_wait), (machine_id, seen)
        started = next(at for event, _, at in rows if event == "started")
        ended = rows[-1][2]
        assert rows[-1][1] == "completed"
        history_intervals[keys[(machine_type, machine_id)]].append(
            Interval(machine_type, machine_id, started, ended)
        )

    assert len(holds) == MACHINES
    assert all(r.EndedAt is not None and r.EndedAt > r.StartedAt for r in holds)
    assert {(r.MachineType, r.MachineID, r.LookupKey) for r in holds} == set(planned)
    hold_intervals: dict[str, list[Interval]] = defaultdict(list)
    for r in holds:
        hold_intervals[r.LookupKey].append(
            Interval(r.MachineType, r.MachineID, r.StartedAt, r.EndedAt)
        )

    history_overlaps = [
        o for k in history_intervals for o in overlapping_conflicts(history_intervals[k])
    ]
    hold_overlaps = [o for k in hold_intervals for o in overlapping_conflicts(hold_intervals[k])]
    out_of_order = [
        (a.machine_id, b.machine_id)
        for key_holds in hold_intervals.values()
        for a, b in itertools.combinations(sorted(key_holds, key=lambda i: i.start), 2)
        if conflicts(a.machine_type, b.machine_type)
        and created[(a.machine_type, a.machine_id)] > created[(b.machine_type, b.machine_id)]
    ]
    harmless_overlaps = sum(
        1
        for key_holds in hold_intervals.values()
        for a, b in itertools.combinations(key_holds, 2)
        if a.start < b.end and b.start < a.end
    )
    peak = max_concurrency([i for v in hold_intervals.values() for i in v])
    history_attempts = sum(1 for r in history if r.Event in ("started", "lock_waiting"))

    print(
        f"\nlock contention: {PROCESSES} processes, {MACHINES} machines over {KEYS} keys "
        f"{dict(planned_types)}; setup {setup_seconds:.1f}s\n"
        f"  start attempts {totals['start_attempts']} (acquired {totals['acquired']}, "
        f"began waiting {totals['began_waiting']}, rechecked still blocked "
        f"{totals['rechecked_still_blocked']}); history started+lock_waiting rows "
        f"{history_attempts}; machines that waited {waited}\n"
        f"  overlaps of conflicting holders: history {len(history_overlaps)}, "
        f"LOCK_HOLD {len(hold_overlaps)}; FIFO violations {len(out_of_order)}; "
        f"non-conflicting overlaps on a key {harmless_overlaps}; peak concurrent holds {peak}\n"
        f"  wall {wall:.1f}s, throughput {MACHINES / wall:.0f} machines/s, "
        f"store errors {totals['store_errors']}, idle polls {totals['idle_polls']}"
    )
    assert history_overlaps == []
    assert hold_overlaps == []
    assert out_of_order == []
    assert still_held == []
    assert totals["acquired"] == MACHINES
    assert totals["began_waiting"] == waited
    assert history_attempts == MACHINES + waited
    assert waited > 0
    assert peak > 1


# -- b. lease takeover after SIGKILL -----------------------------------------------------------


def test_killed_worker_keeps_the_lock_until_its_lease_expires_then_another_takes_over(
    lock_store: Store, tmp_path: Path
) -> None:
    """SIGKILL mid-step: the lease (3 s) holds, then a second worker claims and completes.

    The global lock stays held across the crash, so a waiter on the key keeps waiting until
    the takeover finishes; the step ran twice (at least once); the dead worker's late commit
    at its old version raises StaleWriteError and changes no row, history or lock.
    """
    store = lock_store
    url = store.engine.url.render_as_string(hide_password=False)
    create(store, GLOBAL, "doomed-1", "kill-key")
    command = ["slow", url, GLOBAL, "doomed-1", "30"]
    log = tmp_path / "slow.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.lock_workers", *command],
            cwd=ROOT,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 60
            while not _holds(store, "doomed-1"):
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "the slow worker never entered its step"
                time.sleep(0.05)
            process.send_signal(signal.SIGKILL)
            assert process.wait(timeout=30) == -signal.SIGKILL
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()

    stale = store.load(GLOBAL, "doomed-1")
    assert (stale.state, stale.step, stale.lease_owner) == (State.OPEN, 0, "doomed")
    assert stale.lease_expires_at is not None
    started = store.history(GLOBAL, "doomed-1")[1]
    assert (started.event, started.worker_id) == ("started", "doomed")
    lease = stale.lease_expires_at - started.occurred_at
    assert timedelta(seconds=SLOW_LEASE_SECONDS) <= lease < timedelta(seconds=4)

    rescuer = Engine(store, worker_id="rescuer", lease_seconds=SLOW_LEASE_SECONDS)
    assert store.claim(GLOBAL, "rescuer", SLOW_LEASE_SECONDS, machine_id="doomed-1") == []
    create(store, LOCAL_A, "after-crash", "kill-key")
    assert rescuer.run_due(machine_type=LOCAL_A) == 1
    assert state(store, LOCAL_A, "after-crash") is State.WAITING
    assert waiting_reasons(store, LOCAL_A, "after-crash") == [
        "global lock on kill-key held by lk_global/doomed-1"
    ]

    deadline = time.monotonic() + 15
    while not (claimed := store.claim(GLOBAL, "rescuer", SLOW_LEASE_SECONDS)):
        assert time.monotonic() < deadline, "the expired lease was never taken over"
        time.sleep(0.05)
    (taken,) = claimed
    assert taken.machine.id == "doomed-1"
    assert taken.db_now > stale.lease_expires_at
    assert taken.machine.version == stale.version + 1
    done = rescuer.run_claimed(taken)
    assert done.state is State.COMPLETED
    history = store.history(GLOBAL, "doomed-1")
    assert [(h.event, h.to_state, h.worker_id) for h in history] == [
        ("created", "pending", "test"),
        ("started", "open", "doomed"),
        ("step_succeeded", "completed", "rescuer"),
    ]
    holds = _holds(store, "doomed-1")
    assert [h.EndedAt is None for h in holds] == [True, False]

    assert rescuer.run_due(machine_type=LOCAL_A) == 1
    assert events(store, LOCAL_A, "after-crash") == completed_events(LOCAL_A, waited=True)

    written = store.load(GLOBAL, "doomed-1")
    with store.engine.connect() as conn:
        global_rows = conn.execute(select(tables.global_lock)).all()
        outbox_rows = conn.execute(select(func.count()).select_from(tables.outbox)).scalar()
    definition = store.registry.get_type(GLOBAL)
    late = decisions.step_finished(
        stale,
        definition,
        Success({"late": True}),
        Happening(now=store.db_now(), worker_id="doomed"),
    )
    with pytest.raises(StaleWriteError) as refused:
        store.commit(stale, late, lease_seconds=SLOW_LEASE_SECONDS)
    assert (refused.value.machine_id, refused.value.version) == ("doomed-1", stale.version)
    assert store.load(GLOBAL, "doomed-1") == written
    assert written.data == {"hold_id": holds[1].ID}
    assert store.history(GLOBAL, "doomed-1") == history
    with store.engine.connect() as conn:
        assert conn.execute(select(tables.global_lock)).all() == global_rows
        assert conn.execute(select(func.count()).select_from(tables.outbox)).scalar() == (
            outbox_rows
        )


def _holds(store: Store, machine_id: str) -> list[object]:
    with store.engine.connect() as conn:
        return list(
            conn.execute(
                select(lock_hold)
                .where(lock_hold.c.MachineID == machine_id)
                .order_by(lock_hold.c.ID)
            ).all()
        )


# -- c. type locks -----------------------------------------------------------------------------


def test_reject_type_lock_refuses_new_machines_and_writes_nothing(lock_store: Store) -> None:
    """Under Immediate Rejection, create_machine raises TypeRejectedError; no row is written."""
    store = lock_store
    store.run(
        lambda conn: locks.set_type_lock(
            conn, LOCAL_A, TypeLockKind.REJECT, until=None, actor="ops", reason="migration"
        )
    )
    with pytest.raises(TypeRejectedError) as rejected:
        create(store, LOCAL_A, "refused", "key-r")
    assert str(rejected.value) == (
        "machine type 'lk_local_a' is under an immediate-rejection lock (migration); "
        "clear it with `smw type-lock clear` or wait for its unlock time"
    )
    assert store.count_by_state(LOCAL_A) == {}
    assert store.history(LOCAL_A, "refused") == ()
    create(store, LOCAL_B, "other-type", "key-r")
    assert store.count_by_state(LOCAL_B) == {"pending": 1}

    assert store.run(
        lambda conn: locks.clear_type_lock(
            conn, store.registry, LOCAL_A, actor="ops", reason="migration done"
        )
    )
    create(store, LOCAL_A, "accepted", "key-r")
    Engine(store, worker_id="w").run_until_idle()
    assert state(store, LOCAL_A, "accepted") is State.COMPLETED
    with store.engine.connect() as conn:
        audit = conn.execute(
            select(
                tables.operator_audit.c.Action,
                tables.operator_audit.c.Target,
                tables.operator_audit.c.Actor,
                tables.operator_audit.c.Reason,
            ).order_by(tables.operator_audit.c.ID)
        ).all()
    assert [tuple(r) for r in audit] == [
        ("type_lock.set.reject", "machine_type=lk_local_a", "ops", "migration"),
        ("type_lock.clear", "machine_type=lk_local_a", "ops", "migration done"),
    ]


def test_sleep_type_lock_keeps_new_machines_waiting_until_it_is_cleared(lock_store: Store) -> None:
    """Under a Sleep State lock new machines wait (rechecks included); cleared, they complete."""
    store = lock_store
    store.run(
        lambda conn: locks.set_type_lock(
            conn, LOCAL_B, TypeLockKind.SLEEP, until=None, actor="ops", reason="downstream down"
        )
    )
    create(store, LOCAL_B, "sleeper-1", "key-s1")
    create(store, LOCAL_B, "sleeper-2", "key-s2")
    engine = Engine(store, worker_id="w", lock_recheck_seconds=0.2)
    assert engine.run_due() == 2
    for machine_id in ("sleeper-1", "sleeper-2"):
        assert state(store, LOCAL_B, machine_id) is State.WAITING
        assert waiting_reasons(store, LOCAL_B, machine_id) == [
            "type lk_local_b is under a sleep lock"
        ]
    time.sleep(0.3)
    assert engine.run_due() == 2  # the recheck timers fired; the lock still holds
    assert [state(store, LOCAL_B, m) for m in ("sleeper-1", "sleeper-2")] == [State.WAITING] * 2
    assert events(store, LOCAL_B, "sleeper-1") == ["created", "lock_waiting"]
    assert _holds(store, "sleeper-1") == []
    assert [lock.kind for lock in store.run(locks.list_type_locks)] == [TypeLockKind.SLEEP]

    store.run(
        lambda conn: locks.clear_type_lock(
            conn, store.registry, LOCAL_B, actor="ops", reason="downstream back"
        )
    )
    assert engine.run_due() == 2
    for machine_id in ("sleeper-1", "sleeper-2"):
        assert events(store, LOCAL_B, machine_id) == completed_events(LOCAL_B, waited=True)
    assert store.run(locks.list_type_locks) == []


def test_sleep_type_lock_with_an_unlock_time_lifts_by_itself(lock_store: Store) -> None:
    """A sleep lock whose until is past has no effect; one 3 s ahead wakes its machines then."""
    store = lock_store
    past = store.db_now() - timedelta(seconds=1)
    store.run(
        lambda conn: locks.set_type_lock(
            conn, LOCAL_A, TypeLockKind.SLEEP, until=past, actor="ops", reason="expired"
        )
    )
    create(store, LOCAL_A, "unaffected", "key-u")
    engine = Engine(store, worker_id="w")
    engine.run_until_idle()
    assert events(store, LOCAL_A, "unaffected") == completed_events(LOCAL_A, waited=False)
    assert store.run(locks.list_type_locks) == []

    until = store.db_now() + timedelta(seconds=3)
    store.run(
        lambda conn: locks.set_type_lock(
            conn, LOCAL_A, TypeLockKind.SLEEP, until=until, actor="ops", reason="short pause"
        )
    )
    create(store, LOCAL_A, "napper", "key-u")
    assert engine.run_due() == 1
    napping = store.load(LOCAL_A, "napper")
    assert (napping.state, napping.next_run_at) == (State.WAITING, until)
    assert engine.run_due() == 0
    engine.run_until_idle(wait_for_timers=True, max_wait=15)
    history = store.history(LOCAL_A, "napper")
    assert [h.event for h in history] == completed_events(LOCAL_A, waited=True)
    assert history[2].occurred_at >= until


# -- d. global and local locks respect each other; FIFO ----------------------------------------


def test_global_holder_makes_a_local_machine_of_another_type_wait_until_it_ends(
    lock_store: Store,
) -> None:
    """A GLOBAL holder on K blocks a LOCAL machine of another type on K; its end wakes it."""
    store = lock_store
    create(store, GLOBAL, "g-1", "K")
    held = hold(store, GLOBAL, "g-1")
    create(store, LOCAL_A, "l-1", "K")
    create(store, LOCAL_A, "elsewhere", "other-key")
    engine = Engine(store, worker_id="w")
    assert engine.run_due() == 2
    assert state(store, LOCAL_A, "l-1") is State.WAITING
    assert waiting_reasons(store, LOCAL_A, "l-1") == ["global lock on K held by lk_global/g-1"]
    assert state(store, LOCAL_A, "elsewhere") is State.COMPLETED

    assert finish(store, held).state is State.COMPLETED
    woken = store.load(LOCAL_A, "l-1")
    assert woken.next_run_at is not None
    assert woken.next_run_at <= store.db_now()
    assert engine.run_due() == 1
    assert events(store, LOCAL_A, "l-1") == completed_events(LOCAL_A, waited=True)
    global_hold, local_hold = _holds(store, "g-1")[0], _holds(store, "l-1")[0]
    assert global_hold.EndedAt <= local_hold.StartedAt


def test_local_holder_blocks_global_and_its_own_type_but_not_another_local_type(
    lock_store: Store,
) -> None:
    """A LOCAL holder on K blocks GLOBAL, BOTH and its own type on K; another LOCAL type runs."""
    store = lock_store
    create(store, LOCAL_A, "a-1", "K")
    held = hold(store, LOCAL_A, "a-1")
    create(store, GLOBAL, "g-1", "K")
    create(store, LOCAL_A, "a-2", "K")
    create(store, BOTH, "both-1", "K")
    engine = Engine(store, worker_id="w")
    engine.run_until_idle()
    local_holder = "local lock on K held by STATE_MACHINE_LK_LOCAL_A/a-1"
    assert waiting_reasons(store, GLOBAL, "g-1") == [local_holder]
    assert waiting_reasons(store, LOCAL_A, "a-2") == [local_holder]
    assert waiting_reasons(store, BOTH, "both-1") == [local_holder]
    create(store, LOCAL_B, "b-1", "other-key-first")
    create(store, LOCAL_B, "b-2", "K")
    engine.run_until_idle()
    assert waiting_reasons(store, LOCAL_B, "b-2") == ["queued behind older machine g-1 on K"]

    with store.engine.connect() as conn:
        assert locks.held_locks(conn, store.registry) == [
            HeldLock("local", "K", LOCAL_A, "a-1", None)
        ]
    assert finish(store, held).state is State.COMPLETED
    engine.run_until_idle()
    order = [
        h.MachineID
        for h in sorted(
            (h for m in ("a-1", "g-1", "a-2", "both-1", "b-2") for h in _holds(store, m)),
            key=lambda h: h.StartedAt,
        )
    ]
    assert order == ["a-1", "g-1", "a-2", "both-1", "b-2"]
    for machine_type, machine_id in ((GLOBAL, "g-1"), (LOCAL_A, "a-2"), (BOTH, "both-1")):
        assert state(store, machine_type, machine_id) is State.COMPLETED


def test_newer_local_machine_does_not_overtake_an_older_waiting_global_one(
    lock_store: Store,
) -> None:
    """First come, first served across scopes: a LOCAL machine queues behind an older GLOBAL.

    Without this a stream of local machines of another type could starve a global one.
    """
    store = lock_store
    create(store, LOCAL_A, "a-1", "K")
    held = hold(store, LOCAL_A, "a-1")
    create(store, GLOBAL, "g-1", "K")
    create(store, LOCAL_B, "b-1", "K")
    engine = Engine(store, worker_id="w")
    assert engine.run_one(GLOBAL, "g-1")
    assert engine.run_one(LOCAL_B, "b-1")
    assert waiting_reasons(store, LOCAL_B, "b-1") == ["queued behind older machine g-1 on K"]
    finish(store, held)
    assert engine.run_one(LOCAL_B, "b-1")  # woken with g-1, but g-1 goes first
    assert state(store, LOCAL_B, "b-1") is State.WAITING
    assert engine.run_one(GLOBAL, "g-1")
    assert state(store, GLOBAL, "g-1") is State.COMPLETED
    assert engine.run_one(LOCAL_B, "b-1")
    assert events(store, LOCAL_B, "b-1") == completed_events(LOCAL_B, waited=True)
    g_hold, b_hold = _holds(store, "g-1")[0], _holds(store, "b-1")[0]
    assert g_hold.EndedAt <= b_hold.StartedAt


def test_local_machines_on_one_key_start_in_creation_order(lock_store: Store) -> None:
    """Three LOCAL machines on a key, offered to the engine newest first, run oldest first."""
    store = lock_store
    for machine_id in ("first", "second", "third"):
        create(store, LOCAL_A, machine_id, "K")
    engine = Engine(store, worker_id="w")
    assert engine.run_one(LOCAL_A, "third")
    assert engine.run_one(LOCAL_A, "second")
    assert waiting_reasons(store, LOCAL_A, "third") == ["queued behind older machine first on K"]
    assert waiting_reasons(store, LOCAL_A, "second") == ["queued behind older machine first on K"]
    assert engine.run_one(LOCAL_A, "first")
    assert not engine.run_one(LOCAL_A, "third")  # only the oldest waiter was woken
    assert store.load(LOCAL_A, "second").next_run_at <= store.db_now()  # type: ignore[operator]
    engine.run_until_idle()
    started = {
        m: next(h for h in store.history(LOCAL_A, m) if h.event == "started")
        for m in ("first", "second", "third")
    }
    assert started["first"].occurred_at < started["second"].occurred_at
    assert started["second"].occurred_at < started["third"].occurred_at
    holds = [_holds(store, m)[0] for m in ("first", "second", "third")]
    assert [h.ID for h in holds] == sorted(h.ID for h in holds)
    assert holds[0].EndedAt <= holds[1].StartedAt
    assert holds[1].EndedAt <= holds[2].StartedAt


# -- e. operator force release -----------------------------------------------------------------


def test_operator_force_release_frees_the_key_audits_it_and_wakes_the_waiter(
    lock_store: Store,
) -> None:
    """locks.force_release releases global and local locks on a key, audits, wakes the waiter."""
    store = lock_store
    create(store, BOTH, "stuck", "K")
    held = hold(store, BOTH, "stuck")
    create(store, LOCAL_A, "waiter", "K")
    engine = Engine(store, worker_id="w")
    assert engine.run_due() == 1
    assert waiting_reasons(store, LOCAL_A, "waiter") == ["global lock on K held by lk_both/stuck"]
    with store.engine.connect() as conn:
        since = conn.execute(select(tables.global_lock.c.LockTimestamp)).scalar_one()
        assert locks.held_locks(conn, store.registry) == [
            HeldLock("global", "K", BOTH, "stuck", utc(since)),
            HeldLock("local", "K", BOTH, "stuck", None),
        ]

    with pytest.raises(WorkerError):
        store.run(lambda conn: locks.force_release(conn, store.registry, "K", " ", "no actor"))
    with store.engine.connect() as conn:
        assert len(locks.held_locks(conn, store.registry)) == 2

    released = store.run(
        lambda conn: locks.force_release(
            conn, store.registry, "K", actor="ops-oncall", reason="holder stuck"
        )
    )
    assert released == 2
    with store.engine.connect() as conn:
        assert locks.held_locks(conn, store.registry) == []
        audit = conn.execute(
            select(
                tables.operator_audit.c.Action,
                tables.operator_audit.c.Target,
                tables.operator_audit.c.Actor,
                tables.operator_audit.c.Reason,
            )
        ).all()
    assert [tuple(r) for r in audit] == [
        ("lock.release", "lookup_key=K", "ops-oncall", "holder stuck")
    ]
    woken = store.load(LOCAL_A, "waiter")
    assert woken.next_run_at is not None
    assert woken.next_run_at <= store.db_now()
    assert engine.run_due() == 1
    assert events(store, LOCAL_A, "waiter") == completed_events(LOCAL_A, waited=True)

    assert finish(store, held).state is State.COMPLETED
    with store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(tables.global_lock)).scalar() == 1
        assert locks.held_locks(conn, store.registry) == []
