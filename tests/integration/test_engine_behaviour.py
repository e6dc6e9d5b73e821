"""The engine's behaviour, run unchanged against SQLite and a real MariaDB/MySQL."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import event

from tests.conftest import ROOT, make_store
from tests.engine_machines import HOOK_CALLS, scripted, scripted_async, scripted_batched
from worker import decisions
from worker.decisions import Happening
from worker.definition import MachineType, Registry
from worker.engine import Engine
from worker.errors import CommandRejectedError, DuplicateMachineError, RequestPendingError
from worker.records import Machine, Request
from worker.states import State
from worker.store import Store

REGISTRY_TYPES = (scripted, scripted_async, scripted_batched)


@pytest.fixture(params=["sqlite", "mariadb"])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    url = (
        request.getfixturevalue("sqlite_url")
        if request.param == "sqlite"
        else request.getfixturevalue("fresh_mysql_url")
    )
    built = make_store(url, Registry(REGISTRY_TYPES))
    yield built
    built.engine.dispose()


def start(
    store: Store,
    data: dict[str, object],
    *,
    machine_type: MachineType = scripted,
    machine_id: str = "m1",
    key: str = "acct-1",
) -> Machine:
    at = Happening(now=store.db_now())
    return store.create_machine(decisions.create(machine_type, machine_id, key, data, at))


def events(store: Store, machine: Machine) -> list[tuple[str, str, str]]:
    return [
        (h.event, h.from_state, h.to_state) for h in store.history(machine.machine_type, machine.id)
    ]


def test_forward_runs_every_step_in_order_and_persists_each_transition(store: Store) -> None:
    m = start(store, {"order": 7})
    Engine(store, worker_id="w").run_until_idle()
    done = store.load("scripted", m.id)
    assert done.state is State.COMPLETED
    assert done.data["trail"] == ["one", "two", "three", "four", "five"]
    assert done.data["order"] == 7
    assert events(store, m) == [
        ("created", "pending", "pending"),
        ("started", "pending", "open"),
        *[("step_succeeded", "open", "open")] * 4,
        ("step_succeeded", "open", "completed"),
    ]
    history = store.history("scripted", m.id)
    assert [h.sequence for h in history] == [1, 2, 3, 4, 5, 6, 7]
    assert history[2].input_data == {"order": 7}
    assert history[2].output_data == {"order": 7, "one_done": True, "trail": ["one"]}
    assert all(h.worker_id == "w" for h in history[1:])


def test_a_machine_without_locks_commits_its_start_with_its_first_step(store: Store) -> None:
    m = start(store, {"order": 1})
    commits: list[int] = []
    event.listen(store.engine, "commit", lambda conn: commits.append(1))
    assert Engine(store, worker_id="w").run_one("scripted", m.id)
    assert store.load("scripted", m.id).state is State.COMPLETED
    assert len(commits) == 1 + 5, "the claim, then one transaction per step"
    history = store.history("scripted", m.id)
    assert [h.event for h in history[1:3]] == ["started", "step_succeeded"]
    assert history[1].occurred_at <= history[2].occurred_at


def test_retry_is_a_durable_timer_and_the_step_runs_again_when_due(store: Store) -> None:
    m = start(store, {"script": {"two": "flaky"}})
    engine = Engine(store, worker_id="w")
    engine.run_until_idle()
    waiting = store.load("scripted", m.id)
    assert (waiting.state, waiting.step, waiting.retry_count) == (State.RETRY, 1, 1)
    assert waiting.next_run_at is not None
    assert waiting.last_retry_at is not None
    assert waiting.next_run_at > waiting.last_retry_at
    assert engine.run_due() == 0
    engine.run_until_idle(wait_for_timers=True)
    done = store.load("scripted", m.id)
    assert (done.state, done.retry_count) == (State.COMPLETED, 0)
    errors = [h.error for h in store.history("scripted", m.id) if h.event == "retry_scheduled"]
    assert errors == [
        "RuntimeError: two broke on attempt 1",
        "RuntimeError: two broke on attempt 2",
    ]


def test_exhausted_retries_fail_the_machine_with_the_last_error(store: Store) -> None:
    m = start(store, {"script": {"one": "raise"}})
    Engine(store, worker_id="w").run_until_idle(wait_for_timers=True)
    failed = store.load("scripted", m.id)
    assert failed.state is State.FAILED
    last = store.history("scripted", m.id)[-1]
    assert (last.event, last.error, last.attempt) == (
        "step_failed",
        "gave up after 3 attempts: RuntimeError: one broke on attempt 3",
        3,
    )


def test_rollback_compensates_the_completed_steps_newest_first(store: Store) -> None:
    m = start(store, {"script": {"four": "rollback"}})
    Engine(store, worker_id="w").run_until_idle()
    rolled = store.load("scripted", m.id)
    assert rolled.state is State.ROLLBACK_COMPLETED
    assert rolled.data["undone"] == ["three", "two", "one"]
    compensated = [
        h.handler for h in store.history("scripted", m.id) if h.event == "step_compensated"
    ]
    assert compensated == ["three", "two", "one"]


def test_pause_takes_effect_after_the_step_and_resume_continues_there(store: Store) -> None:
    HOOK_CALLS.clear()
    m = start(store, {}, machine_type=scripted_async)
    engine = Engine(store, worker_id="w")
    engine.run_due()  # started; step one is scheduled
    engine.run_due()  # ran step one; step two is scheduled
    store.record_request("scripted_async", m.id, Request("pause", "cmd-pause"))
    with pytest.raises(RequestPendingError):
        store.record_request("scripted_async", m.id, Request("cancel", "cmd-cancel"))
    engine.run_until_idle()
    paused = store.load("scripted_async", m.id)
    assert (paused.state, paused.step) == (State.PAUSED, 1)
    assert HOOK_CALLS == [("pause", "two")]
    with pytest.raises(CommandRejectedError):
        store.record_request("scripted_async", m.id, Request("pause", "again"))
    store.record_request("scripted_async", m.id, Request("resume", "cmd-resume"))
    engine.run_until_idle()
    done = store.load("scripted_async", m.id)
    assert done.state is State.COMPLETED
    assert done.data["trail"] == ["one", "two", "three", "four", "five"]
    assert HOOK_CALLS == [("pause", "two"), ("resume", "two")]
    by_command = {
        h.command_id: h.event for h in store.history("scripted_async", m.id) if h.command_id
    }
    assert by_command == {"cmd-pause": "paused", "cmd-resume": "resumed"}


def test_cancel_stops_a_scheduled_machine(store: Store) -> None:
    m = start(store, {}, machine_type=scripted_async)
    engine = Engine(store, worker_id="w")
    engine.run_due()
    engine.run_due()
    store.record_request("scripted_async", m.id, Request("cancel", "c1", reason="customer"))
    engine.run_until_idle()
    cancelled = store.load("scripted_async", m.id)
    assert cancelled.state is State.CANCELLED
    assert cancelled.uses_local_lock is True
    assert cancelled.unlocked_at is not None


def test_parked_machine_waits_for_an_operator_override(store: Store) -> None:
    m = start(store, {"script": {"three": "park"}})
    engine = Engine(store, worker_id="w")
    engine.run_until_idle()
    parked = store.load("scripted", m.id)
    assert (parked.state, parked.last_error) == (State.PARKED, "three needs a human")
    request = Request(
        "override", "op-1", actor="alice", reason="verified by phone", target_state="completed"
    )
    store.record_request("scripted", m.id, request)
    engine.run_until_idle()
    last = store.history("scripted", m.id)[-1]
    assert (last.event, last.to_state, last.actor, last.reason) == (
        "overridden",
        "completed",
        "alice",
        "verified by phone",
    )


def test_non_json_data_parks_the_machine_and_names_the_key(store: Store) -> None:
    m = start(store, {"script": {"one": "not_json"}})
    Engine(store, worker_id="w").run_until_idle()
    parked = store.load("scripted", m.id)
    assert parked.state is State.PARKED
    assert parked.last_error == (
        "step one returned data that is not JSON: data at data.when has type object, which "
        "JSON cannot hold; store strings, numbers, booleans, null, lists or objects only"
    )


def test_changed_definition_parks_the_machine_instead_of_running_the_wrong_step(
    store: Store,
) -> None:
    m = start(store, {}, machine_type=scripted_async)
    first = Engine(store, worker_id="w")
    first.run_due()
    first.run_due()
    reordered = MachineType(
        name="scripted_async",
        steps=(scripted_async.steps[1], scripted_async.steps[0], *scripted_async.steps[2:]),
        execute_synchronously=False,
    )
    changed = Store(store.engine, Registry([reordered, scripted, scripted_batched]))
    Engine(changed, worker_id="w2").run_until_idle()
    parked = store.load("scripted_async", m.id)
    assert parked.state is State.PARKED
    assert (parked.last_error or "").startswith("definition changed incompatibly at step 1")


def test_batched_type_commits_all_transitions_together_with_full_history(store: Store) -> None:
    m = start(store, {}, machine_type=scripted_batched)
    Engine(store, worker_id="w").run_until_idle()
    assert store.load("scripted_batched", m.id).state is State.COMPLETED
    assert [h.sequence for h in store.history("scripted_batched", m.id)] == list(range(1, 8))


def test_duplicate_ids_are_refused_and_machines_are_listed_by_state_and_key(
    store: Store,
) -> None:
    for n in range(5):
        start(
            store, {"script": {"one": "park"}} if n % 2 else {}, machine_id=f"m{n}", key=f"k{n % 2}"
        )
    with pytest.raises(DuplicateMachineError):
        start(store, {}, machine_id="m0")
    Engine(store, worker_id="w").run_until_idle()
    assert [m.id for m in store.list_machines("scripted", state="parked")] == ["m1", "m3"]
    assert [m.id for m in store.list_machines("scripted", lookup_key="k0")] == ["m0", "m2", "m4"]
    first = store.list_machines("scripted", limit=2)
    rest = store.list_machines("scripted", limit=10, after_id=first[-1].id)
    assert [m.id for m in first + rest] == ["m0", "m1", "m2", "m3", "m4"]
    assert store.count_by_state("scripted") == {"completed": 3, "parked": 2}


def test_machine_records_round_trip_through_json(store: Store) -> None:
    m = start(store, {"nested": {"list": [1, 2.5, None, "é"]}})
    loaded = store.load("scripted", m.id)
    assert Machine.from_json(loaded.to_json()) == loaded


KILLED_RUN = """
import sys
from tests.conftest import make_store
from tests.engine_machines import KillAfterStep, scripted, scripted_async, scripted_batched
from worker.definition import Registry
from worker.engine import Engine
store = make_store(sys.argv[1], Registry([scripted, scripted_async, scripted_batched]))
Engine(store, worker_id="doomed", lease_seconds=1, hooks=KillAfterStep("two")).run_until_idle()
"""
RESUMED_RUN = """
import sys
from tests.conftest import make_store
from tests.engine_machines import scripted, scripted_async, scripted_batched
from worker.definition import Registry
from worker.engine import Engine
store = make_store(sys.argv[1], Registry([scripted, scripted_async, scripted_batched]))
Engine(store, worker_id="heir").run_until_idle()
"""


def test_a_run_killed_between_steps_resumes_in_a_new_process_with_the_same_outcome(
    store: Store,
) -> None:
    url = store.engine.url.render_as_string(hide_password=False)
    killed = start(store, {"script": {"four": "rollback"}}, machine_id="killed")
    untouched = start(store, {"script": {"four": "rollback"}}, machine_id="reference")
    del untouched
    first = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, url], cwd=ROOT, check=False, timeout=60
    )
    assert first.returncode == -9
    mid = store.load("scripted", killed.id)
    assert (mid.state, mid.step, mid.lease_owner) == (State.OPEN, 2, "doomed")
    time.sleep(1.2)  # the dead worker's lease runs out
    second = subprocess.run(
        [sys.executable, "-c", RESUMED_RUN, url], cwd=ROOT, check=False, timeout=60
    )
    assert second.returncode == 0
    resumed, reference = store.load("scripted", "killed"), store.load("scripted", "reference")
    assert resumed.state is reference.state is State.ROLLBACK_COMPLETED
    assert resumed.data == reference.data
    shape = [
        [(h.event, h.from_state, h.to_state, h.handler) for h in store.history("scripted", i)]
        for i in ("killed", "reference")
    ]
    assert shape[0] == shape[1]
