"""Business locks on SQLite, the embedded default: one process, the same semantics as MySQL."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select

from tests.conftest import make_store
from worker import decisions, locks, tables
from worker.decisions import Happening
from worker.definition import LockPolicy, MachineType, Registry, StepContext, step
from worker.engine import Engine
from worker.errors import TypeRejectedError
from worker.locks import HeldLock, TypeLockKind
from worker.records import HistoryEntry, Machine, utc
from worker.states import State
from worker.store import Claimed, Store

pytestmark = pytest.mark.unit

LOCAL_A = "sq_local_a"
LOCAL_B = "sq_local_b"
GLOBAL = "sq_global"
BOTH = "sq_both"


def _work(ctx: StepContext) -> dict[str, Any]:
    return {"ran": ctx.machine_id}


TYPES = (
    MachineType(LOCAL_A, (step("work", _work),), lock_policy=LockPolicy.LOCAL),
    MachineType(LOCAL_B, (step("work", _work),), lock_policy=LockPolicy.LOCAL),
    MachineType(GLOBAL, (step("work", _work),), lock_policy=LockPolicy.GLOBAL),
    MachineType(BOTH, (step("work", _work),), lock_policy=LockPolicy.BOTH),
)
DONE = ["created", "started", "step_succeeded"]
WAITED_DONE = ["created", "lock_waiting", "started", "step_succeeded"]


@pytest.fixture
def store(sqlite_url: str) -> Iterator[Store]:
    built = make_store(sqlite_url, Registry(TYPES))
    yield built
    built.engine.dispose()


def create(store: Store, machine_type: str, machine_id: str, key: str) -> Machine:
    definition = store.registry.get_type(machine_type)
    at = Happening(now=store.db_now(), worker_id="test")
    return store.create_machine(decisions.create(definition, machine_id, key, {}, at))


def hold(store: Store, machine_type: str, machine_id: str) -> Machine:
    """Claim the machine and take its locks without running a step, as worker `holder`."""
    (claimed,) = store.claim(machine_type, "holder", 60, machine_id=machine_id)
    at = Happening(now=claimed.db_now, worker_id="holder")
    definition = store.registry.get_type(machine_type)
    opened, _ = store.start(claimed.machine, definition, at, lease_seconds=60)
    assert opened.state is State.OPEN
    return opened


def finish(store: Store, held: Machine) -> Machine:
    engine = Engine(store, worker_id="holder", lease_seconds=60)
    return engine.run_claimed(Claimed(held, store.db_now()))


def history(store: Store, machine_type: str, machine_id: str) -> tuple[HistoryEntry, ...]:
    return store.history(machine_type, machine_id)


def events(store: Store, machine_type: str, machine_id: str) -> list[str]:
    return [h.event for h in history(store, machine_type, machine_id)]


def waiting_reasons(store: Store, machine_type: str, machine_id: str) -> list[str | None]:
    return [h.reason for h in history(store, machine_type, machine_id) if h.event == "lock_waiting"]


def at_event(store: Store, machine_type: str, machine_id: str, event: str) -> Any:
    return next(h.occurred_at for h in history(store, machine_type, machine_id) if h.event == event)


def held(store: Store) -> list[HeldLock]:
    return store.run(lambda conn: locks.held_locks(conn, store.registry))


def test_local_lock_makes_the_second_machine_on_a_key_wait_and_run_after_the_first(
    store: Store,
) -> None:
    """While the first LOCAL machine holds K, the second waits; the first's end starts it."""
    create(store, LOCAL_A, "first", "K")
    first = hold(store, LOCAL_A, "first")
    create(store, LOCAL_A, "second", "K")
    engine = Engine(store, worker_id="w")
    assert engine.run_until_idle() == 1
    second = store.load(LOCAL_A, "second")
    assert (second.state, second.uses_local_lock) == (State.WAITING, False)
    assert waiting_reasons(store, LOCAL_A, "second") == [
        "local lock on K held by STATE_MACHINE_SQ_LOCAL_A/first"
    ]
    assert engine.run_until_idle() == 0

    assert finish(store, first).state is State.COMPLETED
    done = store.load(LOCAL_A, "first")
    assert (done.state, done.uses_local_lock) == (State.COMPLETED, True)
    assert done.unlocked_at is not None
    assert done.unlocked_at <= store.db_now()
    assert engine.run_until_idle() == 1
    assert events(store, LOCAL_A, "second") == WAITED_DONE
    assert store.load(LOCAL_A, "second").data == {"ran": "second"}
    assert at_event(store, LOCAL_A, "second", "started") >= at_event(
        store, LOCAL_A, "first", "step_succeeded"
    )
    assert held(store) == []


def test_global_lock_blocks_local_machines_of_other_types_and_local_blocks_global(
    store: Store,
) -> None:
    """GLOBAL on K blocks LOCAL of any type on K; a LOCAL holder on J blocks GLOBAL on J."""
    create(store, GLOBAL, "g", "K")
    global_holder = hold(store, GLOBAL, "g")
    create(store, LOCAL_A, "a", "K")
    create(store, LOCAL_B, "b", "K")
    create(store, LOCAL_A, "a-holder", "J")
    local_holder = hold(store, LOCAL_A, "a-holder")
    create(store, GLOBAL, "g-j", "J")
    engine = Engine(store, worker_id="w")
    assert engine.run_until_idle() == 3
    assert waiting_reasons(store, LOCAL_A, "a") == ["global lock on K held by sq_global/g"]
    assert waiting_reasons(store, LOCAL_B, "b") == ["global lock on K held by sq_global/g"]
    assert waiting_reasons(store, GLOBAL, "g-j") == [
        "local lock on J held by STATE_MACHINE_SQ_LOCAL_A/a-holder"
    ]

    finish(store, global_holder)
    assert engine.run_until_idle() == 2
    assert events(store, LOCAL_A, "a") == WAITED_DONE
    assert events(store, LOCAL_B, "b") == WAITED_DONE
    assert store.load(GLOBAL, "g-j").state is State.WAITING
    finish(store, local_holder)
    assert engine.run_until_idle() == 1
    assert events(store, GLOBAL, "g-j") == WAITED_DONE
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(tables.global_lock.c.StateMachineID, tables.global_lock.c.LookupKey)
            .where(tables.global_lock.c.UnlockTimestamp.is_not(None))
            .order_by(tables.global_lock.c.ID)
        ).all()
    assert [tuple(r) for r in rows] == [("g", "K"), ("g-j", "J")]


def test_local_locks_of_another_type_or_another_key_do_not_block(store: Store) -> None:
    """A LOCAL holder blocks only its own type on its own key."""
    create(store, LOCAL_A, "holder", "K")
    holder = hold(store, LOCAL_A, "holder")
    create(store, LOCAL_B, "other-type", "K")
    create(store, LOCAL_A, "other-key", "J")
    assert Engine(store, worker_id="w").run_until_idle() == 2
    assert events(store, LOCAL_B, "other-type") == DONE
    assert events(store, LOCAL_A, "other-key") == DONE
    assert held(store) == [HeldLock("local", "K", LOCAL_A, "holder", None)]
    finish(store, holder)
    assert held(store) == []


def test_conflicting_machines_start_first_come_first_served(store: Store) -> None:
    """Oldest first among conflicting machines: no LOCAL machine overtakes an older GLOBAL one.

    a-2 (LOCAL_A) and b-1 (LOCAL_B) were offered before g-1 but start after it, because g-1
    is older and conflicts with both; b-1 and a-2 do not conflict with each other.
    """
    create(store, LOCAL_A, "a-1", "K")
    holder = hold(store, LOCAL_A, "a-1")
    create(store, GLOBAL, "g-1", "K")
    create(store, LOCAL_B, "b-1", "K")
    create(store, LOCAL_A, "a-2", "K")
    engine = Engine(store, worker_id="w")
    assert engine.run_one(LOCAL_A, "a-2")
    assert engine.run_one(LOCAL_B, "b-1")
    assert engine.run_one(GLOBAL, "g-1")
    assert waiting_reasons(store, LOCAL_A, "a-2") == [
        "local lock on K held by STATE_MACHINE_SQ_LOCAL_A/a-1"
    ]
    assert waiting_reasons(store, LOCAL_B, "b-1") == ["queued behind older machine g-1 on K"]
    assert waiting_reasons(store, GLOBAL, "g-1") == [
        "local lock on K held by STATE_MACHINE_SQ_LOCAL_A/a-1"
    ]
    finish(store, holder)
    engine.run_until_idle()
    started = {
        machine_id: at_event(store, machine_type, machine_id, "started")
        for machine_type, machine_id in (
            (LOCAL_A, "a-1"),
            (GLOBAL, "g-1"),
            (LOCAL_B, "b-1"),
            (LOCAL_A, "a-2"),
        )
    }
    assert sorted(started, key=lambda m: started[m])[:2] == ["a-1", "g-1"]
    g_done = at_event(store, GLOBAL, "g-1", "step_succeeded")
    assert started["b-1"] >= g_done
    assert started["a-2"] >= g_done
    assert events(store, LOCAL_B, "b-1") == WAITED_DONE
    assert events(store, LOCAL_A, "a-2") == WAITED_DONE


def test_reject_type_lock_refuses_new_machines_and_writes_nothing(store: Store) -> None:
    """Immediate Rejection: create_machine raises TypeRejectedError and stores nothing."""
    store.run(
        lambda conn: locks.set_type_lock(
            conn, GLOBAL, TypeLockKind.REJECT, until=None, actor="ops", reason="incident"
        )
    )
    with pytest.raises(TypeRejectedError) as rejected:
        create(store, GLOBAL, "refused", "K")
    assert rejected.value.machine_type == GLOBAL
    assert store.count_by_state(GLOBAL) == {}
    assert history(store, GLOBAL, "refused") == ()
    create(store, LOCAL_A, "unaffected", "K")
    assert store.count_by_state(LOCAL_A) == {"pending": 1}


def test_sleep_type_lock_holds_new_machines_until_it_is_cleared(store: Store) -> None:
    """Sleep State: new machines wait, even when rechecked; clearing the lock runs them."""
    store.run(
        lambda conn: locks.set_type_lock(
            conn, LOCAL_B, TypeLockKind.SLEEP, until=None, actor="ops", reason="backlog"
        )
    )
    create(store, LOCAL_B, "sleeper", "K")
    create(store, LOCAL_A, "awake", "K")
    engine = Engine(store, worker_id="w", lock_recheck_seconds=0)
    assert engine.run_due() == 2
    assert events(store, LOCAL_A, "awake") == DONE
    assert waiting_reasons(store, LOCAL_B, "sleeper") == ["type sq_local_b is under a sleep lock"]
    assert engine.run_due() == 1  # due again at once, and still asleep
    assert store.load(LOCAL_B, "sleeper").state is State.WAITING
    assert events(store, LOCAL_B, "sleeper") == ["created", "lock_waiting"]

    assert store.run(
        lambda conn: locks.clear_type_lock(
            conn, store.registry, LOCAL_B, actor="ops", reason="caught up"
        )
    )
    assert engine.run_due() == 1
    assert events(store, LOCAL_B, "sleeper") == WAITED_DONE


def test_held_locks_lists_exactly_the_locks_held_now(store: Store) -> None:
    """Held global rows and local rows are listed; waiting and finished machines are not."""
    assert held(store) == []
    create(store, GLOBAL, "g", "K1")
    create(store, LOCAL_A, "a", "K2")
    create(store, BOTH, "both", "K3")
    create(store, LOCAL_B, "done", "K4")
    create(store, LOCAL_A, "waiting", "K2")
    holders = [hold(store, GLOBAL, "g"), hold(store, LOCAL_A, "a"), hold(store, BOTH, "both")]
    Engine(store, worker_id="w").run_until_idle()
    assert store.load(LOCAL_B, "done").state is State.COMPLETED
    assert store.load(LOCAL_A, "waiting").state is State.WAITING
    with store.engine.connect() as conn:
        since = dict(
            conn.execute(
                select(tables.global_lock.c.StateMachineID, tables.global_lock.c.LockTimestamp)
            ).all()
        )
    assert held(store) == [
        HeldLock("global", "K1", GLOBAL, "g", utc(since["g"])),
        HeldLock("global", "K3", BOTH, "both", utc(since["both"])),
        HeldLock("local", "K2", LOCAL_A, "a", None),
        HeldLock("local", "K3", BOTH, "both", None),
    ]
    for machine in holders:
        finish(store, machine)
    Engine(store, worker_id="w").run_until_idle()
    assert held(store) == []
    assert events(store, LOCAL_A, "waiting") == WAITED_DONE
