"""The embedded default, end to end: the example machines on SQLite with an in-process bus.

No Kafka, no MySQL. Commands are built, encoded and decoded exactly as the daemon would
receive them, applied with `apply_command`, and run by the same `Engine` the daemon uses.
Each transition is printed as it commits. `smw demo` (and `make demo`) run `run_demo`.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from worker.commands import apply_command
from worker.definition import Registry
from worker.engine import Engine
from worker.hooks import Hooks
from worker.messages import Command, CommandName, decode_command
from worker.operations import timeline
from worker.records import HistoryEntry, Machine
from worker.states import State
from worker.store import Store

DEMO_HANDLERS = ("handlers",)
MAX_WAIT_SECONDS = 20.0


@dataclass(frozen=True)
class ScenarioResult:
    """One scenario machine: where its script says it must end, and where it ended."""

    label: str
    machine_type: str
    machine_id: str
    lookup_key: str
    expected: State
    final: State
    must_visit: State | None = None
    visited: bool = True

    @property
    def ok(self) -> bool:
        return self.final is self.expected and self.visited

    @property
    def problem(self) -> str:
        if self.final is not self.expected:
            return f"ended {self.final}, expected {self.expected}"
        return f"never went through {self.must_visit}"


@dataclass(frozen=True)
class DemoResult:
    results: tuple[ScenarioResult, ...]
    seconds: float

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def by_label(self) -> dict[str, ScenarioResult]:
        return {r.label: r for r in self.results}


class LivePrinter(Hooks):
    """Prints one line per committed transition: time, type, machine, states, event, step."""

    def __init__(self, out: TextIO, started: float) -> None:
        self.out = out
        self.started = started

    def transition(self, machine: Machine, entry: HistoryEntry) -> None:
        elapsed = time.monotonic() - self.started
        states = f"{entry.from_state} → {entry.to_state}"
        line = (
            f"  {elapsed:6.2f}s  {machine.machine_type:<18} {machine.id[:8]}  {states:<30} "
            f"{entry.event:<17} {entry.handler or '':<20}"
        )
        extras = []
        if entry.error:
            extras.append(f"error: {entry.error}")
        if entry.event == "retry_scheduled" and machine.next_run_at is not None:
            wait = (machine.next_run_at - entry.occurred_at).total_seconds()
            extras.append(f"(next try in {wait:.2f}s)")
        if entry.actor:
            extras.append(f"by {entry.actor}")
        if entry.reason:
            extras.append(f"({entry.reason})")
        self.out.write((line + " " + " ".join(extras)).rstrip() + "\n")
        self.out.flush()


@dataclass(frozen=True)
class _Expectation:
    label: str
    machine: Machine
    expected: State
    must_visit: State | None


class DemoBus:
    """The in-process command bus: encode, decode as the daemon does, apply, run the engine."""

    def __init__(self, store: Store, engine: Engine, out: TextIO) -> None:
        self.store = store
        self.engine = engine
        self.out = out
        self.expectations: list[_Expectation] = []

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def send(self, command: CommandName, machine_type: str, **fields: Any) -> Machine:
        wire = Command(
            command_id=str(uuid.uuid4()), command=command, machine_type=machine_type, **fields
        ).to_json()
        decoded = decode_command(wire)
        machine = apply_command(self.store, decoded)
        self.say(f"  → {_describe(decoded, machine)}")
        return machine

    def start(self, machine_type: str, key: str, **data: Any) -> Machine:
        return self.send(CommandName.START, machine_type, lookup_key=key, data=data)

    def run(self) -> None:
        self.engine.run_until_idle(wait_for_timers=True, max_wait=MAX_WAIT_SECONDS)

    def run_due(self) -> None:
        """Run what is due now, leaving scheduled retries for later."""
        self.engine.run_due()

    def expect(
        self, label: str, machine: Machine, expected: State, must_visit: State | None = None
    ) -> None:
        self.expectations.append(_Expectation(label, machine, expected, must_visit))

    def results(self) -> tuple[ScenarioResult, ...]:
        found = []
        for item in self.expectations:
            machine = self.store.load(item.machine.machine_type, item.machine.id)
            visited = item.must_visit is None or any(
                e.to_state == item.must_visit.value
                for e in self.store.history(machine.machine_type, machine.id)
            )
            found.append(
                ScenarioResult(
                    label=item.label,
                    machine_type=machine.machine_type,
                    machine_id=machine.id,
                    lookup_key=machine.lookup_key,
                    expected=item.expected,
                    final=machine.state,
                    must_visit=item.must_visit,
                    visited=visited,
                )
            )
        return tuple(found)


def _describe(command: Command, machine: Machine) -> str:
    if command.command is CommandName.START:
        data = json.dumps(command.data or {}, sort_keys=True)
        return f"start {command.machine_type} {machine.id[:8]} key={command.lookup_key} data={data}"
    text = f"{command.command} {command.machine_type} {machine.id[:8]}"
    if command.target_state:
        text += f" target={command.target_state}"
    if command.actor:
        text += f" by {command.actor} ({command.reason})"
    return text


# -- the scenarios -------------------------------------------------------------------------


def happy_path(bus: DemoBus) -> None:
    order = bus.start("order_saga", "acct-1001", amount=42)
    bus.run()
    bus.expect("order: happy path", order, State.COMPLETED)


def retry_path(bus: DemoBus) -> None:
    order = bus.start("order_saga", "acct-1002", amount=15, payment_failures=2)
    bus.run()
    bus.expect("order: payment retried twice", order, State.COMPLETED, must_visit=State.RETRY)


def rollback_path(bus: DemoBus) -> None:
    order = bus.start("order_saga", "acct-1003", amount=99, address_invalid=True)
    bus.run()
    bus.expect("order: rolled back", order, State.ROLLBACK_COMPLETED, must_visit=State.ROLLBACK)


def parked_then_override(bus: DemoBus) -> None:
    order = bus.start("order_saga", "acct-1004", amount=5000, fraud_review=True)
    bus.run()
    bus.say("  (parked: an operator reviews the order and cancels it)")
    bus.send(
        CommandName.OVERRIDE,
        "order_saga",
        machine_id=order.id,
        target_state=State.CANCELLED.value,
        actor="ops-oncall",
        reason="fraud confirmed by review",
    )
    bus.run()
    bus.say(f"  history of {order.id[:8]}:")
    for line in timeline(bus.store.history("order_saga", order.id)):
        bus.say(f"    {line}")
    bus.expect("order: parked, overridden", order, State.CANCELLED, must_visit=State.PARKED)


def local_lock(bus: DemoBus) -> None:
    first = bus.start("order_saga", "acct-2001", amount=10, payment_failures=1)
    second = bus.start("order_saga", "acct-2001", amount=20)
    bus.run()
    bus.expect("order: holds acct-2001", first, State.COMPLETED, must_visit=State.RETRY)
    bus.expect("order: waits for acct-2001", second, State.COMPLETED, must_visit=State.WAITING)


def onboarding(bus: DemoBus) -> None:
    order = bus.start("order_saga", "acct-3001", amount=30, payment_failures=1)
    bus.run_due()
    ok = bus.start("account_onboarding", "acct-3001", plan="team")
    over = bus.start("account_onboarding", "acct-3002", plan="free", workspace_quota_exceeded=True)
    bus.run()
    bus.expect("order: holds acct-3001", order, State.COMPLETED, must_visit=State.RETRY)
    bus.expect("onboarding: waits, global", ok, State.COMPLETED, must_visit=State.WAITING)
    bus.expect("onboarding: quota exceeded", over, State.FAILED)


def pause_resume(bus: DemoBus) -> None:
    order = bus.start("order_saga", "acct-4001", amount=7)
    bus.send(CommandName.PAUSE, "order_saga", machine_id=order.id)
    bus.run()
    bus.send(CommandName.RESUME, "order_saga", machine_id=order.id)
    bus.run()
    bus.expect("order: paused, resumed", order, State.COMPLETED, must_visit=State.PAUSED)


SCENARIOS: tuple[tuple[str, Callable[[DemoBus], None]], ...] = (
    ("Happy path: an order runs its five steps", happy_path),
    ("Retry: the payment gateway times out twice, backoff grows", retry_path),
    ("Rollback: the carrier rejects the address; completed steps are compensated", rollback_path),
    ("Park: an unknown situation waits for an operator, who overrides it", parked_then_override),
    ("Local lock: two orders on one account; the second waits its turn", local_lock),
    (
        "Global lock: onboarding waits for an order's local lock; another fails for good",
        onboarding,
    ),
    ("Pause and resume: the pause arrives while the order is still queued", pause_resume),
)


# -- running it ------------------------------------------------------------------------------


@contextmanager
def _database(database_url: str | None) -> Iterator[str]:
    if database_url is not None:
        yield database_url
        return
    with tempfile.TemporaryDirectory(prefix="smw-demo-") as folder:
        yield f"sqlite:///{Path(folder) / 'demo.db'}"


def run_demo(database_url: str | None = None, out: TextIO | None = None) -> DemoResult:
    """Run every scenario on a fresh SQLite file (or `database_url`) and report the outcomes."""
    stream = out or sys.stdout
    started = time.monotonic()
    with _database(database_url) as url:
        store = Store(url, Registry.from_modules(DEMO_HANDLERS))
        try:
            store.ensure_schema()
            engine = Engine(store, worker_id="demo", hooks=LivePrinter(stream, started))
            bus = DemoBus(store, engine, stream)
            bus.say(f"State Machine Worker demo: {len(store.registry)} machine types on {url}")
            bus.say("commands go through the in-process bus; each line is a committed transition")
            for number, (title, scenario) in enumerate(SCENARIOS, start=1):
                bus.say()
                bus.say(f"{number}. {title}")
                scenario(bus)
            result = DemoResult(bus.results(), time.monotonic() - started)
        finally:
            store.engine.dispose()
    _summarise(result, stream)
    return result


def _summarise(result: DemoResult, out: TextIO) -> None:
    rows = [
        (
            r.label,
            r.machine_type,
            r.machine_id[:8],
            r.lookup_key,
            r.final.value,
            r.expected.value,
            "ok" if r.ok else "WRONG",
        )
        for r in result.results
    ]
    headers = ("scenario", "type", "machine", "key", "final state", "expected", "")
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows, strict=True)]
    out.write("\nSummary\n")
    for row in (headers, *rows):
        line = "  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True))
        out.write(f"  {line.rstrip()}\n")
    counts = Counter(r.final.value for r in result.results)
    out.write("  final states: " + ", ".join(f"{s} {n}" for s, n in sorted(counts.items())) + "\n")
    if result.ok:
        out.write(
            f"\nall {len(result.results)} machines reached their expected state "
            f"in {result.seconds:.1f}s\n"
        )
    else:
        for r in result.results:
            if not r.ok:
                out.write(f"\nFAILED: {r.label} ({r.machine_id[:8]}) {r.problem}\n")
    out.flush()
