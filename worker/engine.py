"""The engine: runs claimed machines step by step and commits each decision.

It calls handlers (I/O the user wrote), asks `worker.decisions` what each outcome means, and
hands the decision to the store. It never sleeps; timers are NextRunTimestamp in the table.
"""

from __future__ import annotations

import copy
import threading
import time
from datetime import timedelta
from typing import Any

import structlog

from worker import decisions
from worker.decisions import Decision, Happening
from worker.definition import Direction, MachineType, Registry, StepContext
from worker.errors import NotSerializableError, StaleWriteError
from worker.hooks import Hooks
from worker.outcomes import Complete, Outcome, Park, Raised, Success, as_outcome
from worker.records import Machine, check_json
from worker.states import RUNNING, State
from worker.store import Claimed, DbClock, Store

log = structlog.get_logger("worker.engine")


class InFlight:
    """The machines this worker is running now, so their leases can be renewed or handed back."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._machines: dict[tuple[str, str], Machine] = {}

    def add(self, machine: Machine) -> None:
        with self._lock:
            self._machines[(machine.machine_type, machine.id)] = machine

    def discard(self, machine: Machine) -> None:
        with self._lock:
            self._machines.pop((machine.machine_type, machine.id), None)

    def snapshot(self) -> list[Machine]:
        with self._lock:
            return list(self._machines.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._machines)


class Engine:
    """Runs machines for one worker. Thread-safe: each call works on the machine it claimed."""

    def __init__(
        self,
        store: Store,
        *,
        worker_id: str,
        lease_seconds: float = 30.0,
        lock_recheck_seconds: float = 10.0,
        hooks: Hooks | None = None,
        in_flight: InFlight | None = None,
    ) -> None:
        self.store = store
        self.registry: Registry = store.registry
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds
        self.lock_recheck_seconds = lock_recheck_seconds
        self.hooks = hooks or Hooks()
        self.in_flight = in_flight

    # -- driving --------------------------------------------------------------------------

    def run_due(self, *, limit: int = 16, machine_type: str | None = None) -> int:
        """Claim and run every due machine (up to `limit` per type); returns how many ran."""
        names = [machine_type] if machine_type else list(self.registry)
        with self.store.holding_connection():
            return sum(self._claim_and_run(name, limit=limit) for name in names)

    def run_one(self, machine_type: str, machine_id: str) -> bool:
        """Claim and run one machine if it is due and free; the fast path for new work."""
        with self.store.holding_connection():
            return self._claim_and_run(machine_type, machine_id=machine_id) > 0

    def _claim_and_run(
        self, machine_type: str, *, limit: int = 1, machine_id: str | None = None
    ) -> int:
        claimed = self.store.claim(
            machine_type,
            self.worker_id,
            self.lease_seconds,
            limit=limit,
            machine_id=machine_id,
            recheck_seconds=self.lock_recheck_seconds,
        )
        for item in claimed:
            self.run_claimed(item)
        return len(claimed)

    def run_until_idle(self, *, wait_for_timers: bool = False, max_wait: float = 60.0) -> int:
        """Run until nothing is due. With `wait_for_timers`, also wait out scheduled retries.

        Meant for the embedded default, scripts and tests; the daemon polls instead.
        """
        total = 0
        deadline = time.monotonic() + max_wait
        while True:
            ran = self.run_due()
            total += ran
            if ran:
                continue
            if not wait_for_timers or time.monotonic() > deadline:
                return total
            due = [d for d in (self.store.next_due(n) for n in self.registry) if d is not None]
            if not due:
                return total
            wait = (min(due) - self.store.db_now()).total_seconds()
            time.sleep(min(max(wait, 0.01), 1.0))

    def run_claimed(self, claimed: Claimed) -> Machine:
        """Run a leased machine until it stops, waits, or hands its next step to the schedule."""
        with self.store.holding_connection():
            return self._run_claimed(claimed)

    def _run_claimed(self, claimed: Claimed) -> Machine:
        clock = DbClock.at(claimed.db_now)
        committed = claimed.machine
        machine = committed
        carried: tuple[Any, ...] = ()
        start = claimed.start
        if start is not None and not start.continue_now:
            self._observed(machine, start)  # written by the claim
            return machine
        if start is not None:
            machine, carried = start.machine, start.history
        if self.in_flight is not None:
            self.in_flight.add(machine)
        try:
            while True:
                definition = self.registry.get_type(machine.machine_type)
                at = Happening(now=clock.now(), worker_id=self.worker_id)
                if machine.request is not None:
                    decision = self._apply_request(machine, definition, at)
                elif machine.state in (State.PENDING, State.WAITING):
                    committed, started = self.store.start(
                        machine,
                        definition,
                        at,
                        lease_seconds=self.lease_seconds,
                        recheck_seconds=self.lock_recheck_seconds,
                    )
                    machine = committed
                    if machine.updated_at is not None and machine.updated_at > clock.now():
                        clock = DbClock.at(machine.updated_at)  # the start's database time
                    self._observed(machine, started)
                    if machine.state is State.OPEN and machine.lease_owner:
                        self._track(machine)
                        continue
                    return machine
                elif machine.state in RUNNING or machine.state is State.ROLLBACK:
                    decision = decisions.check_definition(
                        machine, definition, at
                    ) or self._run_step(machine, definition, at)
                else:
                    self.store.release_lease(machine)
                    return machine
                if (
                    not definition.save_after_each_step
                    and decision.continue_now
                    and decision.history
                ):
                    carried += decision.history
                    machine = decision.machine
                    continue
                if carried:
                    decision = Decision(
                        machine=decision.machine,
                        history=carried + decision.history,
                        release_locks=decision.release_locks,
                        continue_now=decision.continue_now,
                    )
                    carried = ()
                committed = machine = self._commit(committed, decision)
                if not machine.lease_owner:
                    return machine
                self._track(machine)
        except StaleWriteError:
            self.hooks.stale_write(machine.machine_type, machine.id)
            log.warning(
                "machine.stale_write",
                machine_type=machine.machine_type,
                machine_id=machine.id,
                version=committed.version,
            )
            return machine
        finally:
            if self.in_flight is not None:
                self.in_flight.discard(machine)

    # -- one step -------------------------------------------------------------------------

    def _context(self, machine: Machine, definition: MachineType) -> StepContext:
        step = definition.steps[min(machine.step, len(definition.steps) - 1)]
        return StepContext(
            machine_id=machine.id,
            machine_type=machine.machine_type,
            lookup_key=machine.lookup_key,
            step=step.name,
            step_index=machine.step,
            direction=machine.direction,
            data=copy.deepcopy(machine.data),
            attempt=machine.retry_count + 1,
            idempotency_key=f"{machine.machine_type}:{machine.id}:{step.name}:{machine.direction}",
            log=log.bind(
                machine_type=machine.machine_type,
                machine_id=machine.id,
                step=step.name,
                direction=machine.direction.value,
            ),
            load_history=lambda: self.store.history(machine.machine_type, machine.id),
        )

    def _run_step(self, machine: Machine, definition: MachineType, at: Happening) -> Decision:
        ctx = self._context(machine, definition)
        step = definition.steps[machine.step]
        action = step.forward if machine.direction is Direction.FORWARD else step.backward
        started = time.monotonic()
        outcome: Outcome
        try:
            outcome = as_outcome(action(ctx))
            if isinstance(outcome, Success | Complete):
                check_json(outcome.data)
        except NotSerializableError as exc:
            outcome = Park(reason=f"step {step.name} returned data that is not JSON: {exc}")
        except Exception as exc:  # noqa: BLE001  # a handler's exception is a retryable outcome
            outcome = Raised(error=f"{type(exc).__name__}: {exc}")
        seconds = time.monotonic() - started
        self.hooks.step(machine.machine_type, step.name, seconds, type(outcome).__name__.lower())
        timed = Happening(
            now=at.now + timedelta(seconds=seconds),
            worker_id=self.worker_id,
            duration_ms=round(seconds * 1000, 3),
        )
        return decisions.step_finished(machine, definition, outcome, timed)

    def _apply_request(self, machine: Machine, definition: MachineType, at: Happening) -> Decision:
        assert machine.request is not None  # noqa: S101  # caller checked
        hook = decisions.hook_for(machine, machine.request)
        hook_error = None
        if hook is not None:
            ctx = self._context(machine, definition)
            step = definition.steps[min(machine.step, len(definition.steps) - 1)]
            started = time.monotonic()
            try:
                (step.pause if hook == "pause" else step.resume)(ctx)
            except Exception as exc:  # noqa: BLE001  # recorded in history; the command still applies
                hook_error = f"{hook} hook raised {type(exc).__name__}: {exc}"
            self.hooks.step(
                machine.machine_type, f"{step.name}.{hook}", time.monotonic() - started, hook
            )
        return decisions.apply_request(
            machine, definition, machine.request, at, hook_error=hook_error
        )

    # -- committing -----------------------------------------------------------------------

    def _commit(self, before: Machine, decision: Decision) -> Machine:
        written = self.store.commit(before, decision, lease_seconds=self.lease_seconds)
        self._observed(written, decision)
        return written

    def _observed(self, machine: Machine, decision: Decision) -> None:
        for entry in decision.history:
            self.hooks.transition(machine, entry)
            if entry.to_state == State.WAITING.value and entry.from_state != entry.to_state:
                self.hooks.lock_wait(machine.machine_type, entry.reason or "lock")

    def _track(self, machine: Machine) -> None:
        if self.in_flight is not None:
            self.in_flight.add(machine)
