"""Prometheus metrics as a Hooks implementation, plus the gauges the daemon samples.

Each Metrics owns its CollectorRegistry, so tests and several workers in one process never
share series. No metric has a per-machine label.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from worker.hooks import Hooks
from worker.records import HistoryEntry, Machine

STEP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics(Hooks):
    def __init__(self, version: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.commands = Counter(
            "smw_commands",
            "Commands by type and outcome",
            ["machine_type", "command", "outcome"],
            registry=r,
        )
        self.transitions = Counter(
            "smw_transitions",
            "Committed transitions",
            ["machine_type", "from_state", "to_state"],
            registry=r,
        )
        self.step_duration = Histogram(
            "smw_step_duration_seconds",
            "Step action duration",
            ["machine_type", "step"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.lock_waits = Counter(
            "smw_lock_waits",
            "Machines that had to wait for a lock",
            ["machine_type", "lock"],
            registry=r,
        )
        self.waiting = Gauge(
            "smw_machines_waiting", "Machines waiting for a lock", ["machine_type"], registry=r
        )
        self.parked = Gauge(
            "smw_machines_parked", "Machines parked for an operator", ["machine_type"], registry=r
        )
        self.runnable = Gauge(
            "smw_runnable_backlog", "Machines due to run now", ["machine_type"], registry=r
        )
        self.outbox_backlog = Gauge(
            "smw_outbox_backlog", "Transition events not yet published", registry=r
        )
        self.outbox_age = Gauge(
            "smw_outbox_oldest_age_seconds", "Age of the oldest unpublished event", registry=r
        )
        self.dead_letters = Counter(
            "smw_dead_letters", "Messages sent to the dead-letter topic", ["reason"], registry=r
        )
        self.consumer_lag = Gauge(
            "smw_consumer_lag", "Command consumer lag", ["topic", "partition"], registry=r
        )
        self.build_info = Gauge("smw_build_info", "Worker version", ["version"], registry=r)
        self.build_info.labels(version=version).set(1)

    def command(self, machine_type: str, command: str, outcome: str) -> None:
        self.commands.labels(machine_type=machine_type, command=command, outcome=outcome).inc()

    def transition(self, machine: Machine, entry: HistoryEntry) -> None:
        self.transitions.labels(
            machine_type=machine.machine_type, from_state=entry.from_state, to_state=entry.to_state
        ).inc()

    def step(self, machine_type: str, step: str, seconds: float, outcome: str) -> None:
        del outcome
        self.step_duration.labels(machine_type=machine_type, step=step).observe(seconds)

    def lock_wait(self, machine_type: str, reason: str) -> None:
        lock = "type" if reason.startswith("type ") else "key"
        self.lock_waits.labels(machine_type=machine_type, lock=lock).inc()

    def dead_letter(self, reason: str) -> None:
        self.dead_letters.labels(reason=reason).inc()
