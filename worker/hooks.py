"""Lifecycle hooks. Observability plugs in here; the engine never logs or counts inline.

Every method is a no-op by default. Subclass `Hooks` and override what you need, then pass
several at once with `HookChain`.
"""

from __future__ import annotations

from collections.abc import Iterable

from worker.records import HistoryEntry, Machine


class Hooks:
    def command(self, machine_type: str, command: str, outcome: str) -> None:
        """A command was applied, rejected, seen again or dead-lettered."""

    def transition(self, machine: Machine, entry: HistoryEntry) -> None:
        """A transition committed."""

    def step(self, machine_type: str, step: str, seconds: float, outcome: str) -> None:
        """A step action (or hook) ran."""

    def lock_wait(self, machine_type: str, reason: str) -> None:
        """A machine started waiting for a lock."""

    def stale_write(self, machine_type: str, machine_id: str) -> None:
        """A write was refused because another worker took the machine over."""

    def dead_letter(self, reason: str) -> None:
        """A message went to the dead-letter topic."""


class HookChain(Hooks):
    """Calls each hook in turn."""

    def __init__(self, hooks: Iterable[Hooks]) -> None:
        self.hooks = tuple(hooks)

    def command(self, machine_type: str, command: str, outcome: str) -> None:
        for hook in self.hooks:
            hook.command(machine_type, command, outcome)

    def transition(self, machine: Machine, entry: HistoryEntry) -> None:
        for hook in self.hooks:
            hook.transition(machine, entry)

    def step(self, machine_type: str, step: str, seconds: float, outcome: str) -> None:
        for hook in self.hooks:
            hook.step(machine_type, step, seconds, outcome)

    def lock_wait(self, machine_type: str, reason: str) -> None:
        for hook in self.hooks:
            hook.lock_wait(machine_type, reason)

    def stale_write(self, machine_type: str, machine_id: str) -> None:
        for hook in self.hooks:
            hook.stale_write(machine_type, machine_id)

    def dead_letter(self, reason: str) -> None:
        for hook in self.hooks:
            hook.dead_letter(reason)
