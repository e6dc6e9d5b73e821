"""Pure transition rules: outcomes and requests to decisions, with no database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from worker import decisions
from worker.decisions import Decision, Happening
from worker.definition import Direction, MachineType, Step, fingerprint_compatible
from worker.errors import CommandRejectedError
from worker.outcomes import (
    Cancel,
    Complete,
    Fail,
    Outcome,
    Park,
    Pause,
    Raised,
    Retry,
    Rollback,
    Success,
)
from worker.records import Machine, Request
from worker.retry import RetryPolicy, compute_backoff
from worker.states import RUNNING, TERMINAL, State

T0 = datetime(2026, 1, 1, tzinfo=UTC)
AT = Happening(now=T0, worker_id="w")


class Named(Step):
    def __init__(self, name: str) -> None:
        self.name = name


FOUR = MachineType(
    name="four_steps",
    steps=tuple(Named(n) for n in ("a", "b", "c", "d")),
    retry=RetryPolicy(base_delay=1.0, max_delay=8.0, max_attempts=3, jitter=0.0),
)


def opened() -> Machine:
    created = decisions.create(FOUR, "m1", "acct", {"x": 1}, AT).machine
    return decisions.start(created, FOUR, AT, blocked_by=None, recheck_at=T0).machine


def run(machine: Machine, *outcomes: Outcome) -> Decision:
    decision = Decision(machine=machine)
    for outcome in outcomes:
        decision = decisions.step_finished(decision.machine, FOUR, outcome, AT)
    return decision


def test_create_is_pending_due_now_with_a_created_entry() -> None:
    decision = decisions.create(FOUR, "m1", "acct", {"x": 1}, AT)
    m = decision.machine
    assert (m.state, m.step, m.sequence, m.next_run_at, m.fingerprint) == (
        State.PENDING,
        0,
        1,
        T0,
        "a,b,c,d",
    )
    assert [(e.event, e.from_state, e.to_state) for e in decision.history] == [
        ("created", "pending", "pending")
    ]


def test_success_merges_data_and_moves_on_then_completes_on_the_last_step() -> None:
    d = run(opened(), Success({"y": 2}), Success(), Success(), Success({"z": 3}))
    assert d.machine.state is State.COMPLETED
    assert d.machine.data == {"x": 1, "y": 2, "z": 3}
    assert d.machine.completed_steps == 4
    assert d.release_locks is True
    assert d.machine.next_run_at is None


def test_complete_finishes_early() -> None:
    d = run(opened(), Success(), Complete({"done": True}))
    assert (d.machine.state, d.machine.completed_steps, d.history[0].event) == (
        State.COMPLETED,
        2,
        "completed",
    )


def test_retry_schedules_a_durable_timer_with_exponential_backoff() -> None:
    d1 = run(opened(), Raised("boom"))
    assert (d1.machine.state, d1.machine.retry_count) == (State.RETRY, 1)
    assert d1.machine.next_run_at == T0 + timedelta(seconds=1)
    assert d1.machine.last_retry_at == T0
    d2 = decisions.step_finished(d1.machine, FOUR, Retry("again"), AT)
    assert d2.machine.next_run_at == T0 + timedelta(seconds=2)
    assert d2.history[0].error == "again"
    assert d2.continue_now is False


def test_requested_retry_delay_wins_over_backoff() -> None:
    d = run(opened(), Retry("later", delay=42))
    assert d.machine.next_run_at == T0 + timedelta(seconds=42)


def test_retries_exhausted_fails_with_the_last_error() -> None:
    d = run(opened(), Raised("e1"), Raised("e2"), Raised("e3"))
    assert d.machine.state is State.FAILED
    assert d.history[-1].error == "gave up after 3 attempts: e3"
    assert d.machine.last_error == "gave up after 3 attempts: e3"


def test_rollback_compensates_completed_steps_newest_first_not_the_current_one() -> None:
    """The seed's off-by-one: step c asked for rollback, so b then a are compensated."""
    d = run(opened(), Success(), Success(), Rollback("no"))
    assert (d.machine.state, d.machine.direction, d.machine.step) == (
        State.ROLLBACK,
        Direction.BACKWARD,
        1,
    )
    d = decisions.step_finished(d.machine, FOUR, Success({"undo_b": True}), AT)
    assert (d.machine.state, d.machine.step, d.history[0].handler) == (State.ROLLBACK, 0, "b")
    d = decisions.step_finished(d.machine, FOUR, Success(), AT)
    assert (d.machine.state, d.history[0].handler) == (State.ROLLBACK_COMPLETED, "a")
    assert d.machine.data["undo_b"] is True
    assert d.release_locks is True


def test_rollback_at_step_zero_completes_at_once() -> None:
    d = run(opened(), Rollback())
    assert d.machine.state is State.ROLLBACK_COMPLETED


def test_failed_compensation_after_retries_is_rollback_failed_and_keeps_locks() -> None:
    d = run(opened(), Success(), Rollback())
    d = decisions.step_finished(d.machine, FOUR, Raised("x"), AT)
    assert d.machine.state is State.ROLLBACK
    d = decisions.step_finished(d.machine, FOUR, Raised("y"), AT)
    d = decisions.step_finished(d.machine, FOUR, Raised("z"), AT)
    assert d.machine.state is State.ROLLBACK_FAILED
    assert d.release_locks is False


@pytest.mark.parametrize(
    ("outcome", "state"),
    [
        (Fail("bad"), State.FAILED),
        (Pause(), State.PAUSED),
        (Cancel(), State.CANCELLED),
        (Park("unknown"), State.PARKED),
    ],
)
def test_terminal_and_stopping_outcomes(outcome: Outcome, state: State) -> None:
    d = run(opened(), outcome)
    assert d.machine.state is state
    assert d.machine.next_run_at is None
    assert d.release_locks is (state in TERMINAL)


def test_pause_request_applies_between_steps_and_resume_continues_there() -> None:
    m = run(opened(), Success()).machine
    paused = decisions.apply_request(m, FOUR, Request("pause", "c1"), AT)
    assert (paused.machine.state, paused.machine.step, paused.machine.request) == (
        State.PAUSED,
        1,
        None,
    )
    assert paused.history[0].command_id == "c1"
    resumed = decisions.apply_request(paused.machine, FOUR, Request("resume", "c2"), AT)
    assert (resumed.machine.state, resumed.machine.step) == (State.OPEN, 1)
    assert decisions.hook_for(m, Request("pause", "c1")) == "pause"


def test_a_request_that_no_longer_fits_is_recorded_as_ignored() -> None:
    done = run(opened(), Success(), Success(), Success(), Success()).machine
    d = decisions.apply_request(done, FOUR, Request("pause", "late"), AT)
    assert (d.machine.state, d.history[0].event) == (State.COMPLETED, "request_ignored")
    assert d.history[0].error == "pause is not allowed for a machine in state 'completed'"


def test_override_of_a_parked_machine_records_actor_and_reason() -> None:
    parked = run(opened(), Park("?")).machine
    request = Request("override", "c9", actor="ops", reason="checked", target_state="completed")
    d = decisions.apply_request(parked, FOUR, request, AT)
    entry = d.history[0]
    assert (d.machine.state, entry.event, entry.actor, entry.reason) == (
        State.COMPLETED,
        "overridden",
        "ops",
        "checked",
    )


def test_check_request_rejects_commands_invalid_for_the_state() -> None:
    with pytest.raises(CommandRejectedError) as info:
        decisions.check_request(State.OPEN, "resume")
    assert info.value.reason_code == "invalid_for_state"
    with pytest.raises(CommandRejectedError):
        decisions.check_request(State.PARKED, "override", "pending")
    decisions.check_request(State.PARKED, "override", "open")


def test_definition_change_before_the_position_parks_and_after_it_is_accepted() -> None:
    m = run(opened(), Success(), Success()).machine  # at step c
    reordered = MachineType(name="four_steps", steps=tuple(Named(n) for n in "bacd"))
    d = decisions.check_definition(m, reordered, AT)
    assert d is not None
    assert d.machine.state is State.PARKED
    assert "definition changed incompatibly at step 2" in (d.history[0].error or "")
    appended = MachineType(name="four_steps", steps=tuple(Named(n) for n in "abcde"))
    d2 = decisions.check_definition(m, appended, AT)
    assert d2 is not None
    assert (d2.history, d2.machine.fingerprint) == ((), "a,b,c,d,e")
    assert fingerprint_compatible("a,b,c", "a,b,x", 1) is True
    assert fingerprint_compatible("a,b,c", "a,x,c", 1) is False


def test_backoff_is_capped_and_jitter_stays_in_bounds() -> None:
    policy = RetryPolicy(base_delay=1, max_delay=10, max_attempts=9, jitter=0.2)
    assert [compute_backoff(policy, n, rand=0.5) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    assert compute_backoff(policy, 3, rand=0.0) == pytest.approx(3.2)
    assert compute_backoff(policy, 3, rand=0.999999) == pytest.approx(4.8, rel=1e-4)


OUTCOMES = st.sampled_from(
    [
        Success(),
        Complete(),
        Fail("f"),
        Retry("r"),
        Raised("x"),
        Rollback(),
        Pause(),
        Cancel(),
        Park("p"),
    ]
)
REQUESTS = st.sampled_from(["pause", "resume", "cancel", "rollback", "retry", "override"])
TARGETS = st.sampled_from(["open", "rollback", "completed", "failed", "cancelled"])


class MachineRules(RuleBasedStateMachine):
    """Random outcome and command sequences keep the machine valid and its history whole."""

    def __init__(self) -> None:
        super().__init__()
        self.machine = opened()
        self.sequences = [1, 2]
        self.forward_done: list[str] = []
        self.compensated: list[str] = []
        self.expected_compensation: list[str] | None = None

    def _apply(self, decision: Decision) -> None:
        for entry in decision.history:
            self.sequences.append(entry.sequence)
            if entry.event == "step_succeeded":
                self.forward_done.append(entry.handler or "")
            if entry.event == "step_compensated":
                self.compensated.append(entry.handler or "")
        before = self.machine.direction
        self.machine = decision.machine
        if before is Direction.FORWARD and self.machine.direction is Direction.BACKWARD:
            done = FOUR.step_names[: self.machine.completed_steps]
            self.expected_compensation = list(reversed(done))
            self.compensated = []

    @precondition(lambda self: self.machine.state in RUNNING | {State.ROLLBACK})
    @rule(outcome=OUTCOMES)
    def step_ends(self, outcome: Outcome) -> None:
        self._apply(decisions.step_finished(self.machine, FOUR, outcome, AT))

    @rule(command=REQUESTS, target_state=TARGETS)
    def command_arrives(self, command: str, target_state: str) -> None:
        request = Request(command, "c", actor="ops", reason="r", target_state=target_state)
        self._apply(decisions.apply_request(self.machine, FOUR, request, AT))

    @invariant()
    def state_is_valid(self) -> None:
        assert self.machine.state in set(State)
        assert 0 <= self.machine.step < len(FOUR.steps)

    @invariant()
    def history_has_no_gaps(self) -> None:
        assert self.sequences == list(range(1, len(self.sequences) + 1))
        assert self.machine.sequence == self.sequences[-1]

    @invariant()
    def rollback_compensates_exactly_the_completed_steps_newest_first(self) -> None:
        if self.machine.state is State.ROLLBACK_COMPLETED and self.expected_compensation:
            assert self.compensated == self.expected_compensation


MachineRules.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
TestMachineRules = MachineRules.TestCase


def test_a_machine_paused_before_it_took_its_locks_resumes_into_pending() -> None:
    """Resume never skips lock acquisition: it goes back to pending to take the locks."""
    locked = MachineType(name="locked_four", steps=FOUR.steps, lock_policy="local")
    created = decisions.create(locked, "m2", "acct", {}, AT).machine
    paused = decisions.apply_request(created, locked, Request("pause", "p"), AT).machine
    resumed = decisions.apply_request(paused, locked, Request("resume", "r"), AT).machine
    assert (paused.state, resumed.state, resumed.next_run_at) == (
        State.PAUSED,
        State.PENDING,
        T0,
    )
    holding = opened()
    paused_open = decisions.apply_request(holding, FOUR, Request("pause", "p"), AT).machine
    assert decisions.apply_request(paused_open, FOUR, Request("resume", "r"), AT).machine.state is (
        State.OPEN
    )
