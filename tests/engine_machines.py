"""Machine types used by the engine behaviour tests; scripted through their data."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from worker import (
    LockPolicy,
    MachineType,
    Park,
    RetryPolicy,
    Rollback,
    Step,
    StepContext,
)
from worker.hooks import Hooks
from worker.records import HistoryEntry, Machine

HOOK_CALLS: list[tuple[str, str]] = []


class Scripted(Step):
    """Does what the data tells it at this step: raise, roll back, park, return non-JSON."""

    def __init__(self, name: str) -> None:
        self.name = name

    def forward(self, ctx: StepContext) -> Any:
        script = ctx.data.get("script", {}).get(self.name, "")
        if script == "raise" or (script == "flaky" and ctx.attempt < 3):
            raise RuntimeError(f"{self.name} broke on attempt {ctx.attempt}")
        if script == "rollback":
            return Rollback(reason=f"{self.name} refused")
        if script == "park":
            return Park(reason=f"{self.name} needs a human")
        if script == "not_json":
            return {"when": object()}
        if script == "slow":
            time.sleep(float(ctx.data.get("sleep", 0.5)))
        return {f"{self.name}_done": True, "trail": [*ctx.data.get("trail", []), self.name]}

    def backward(self, ctx: StepContext) -> dict[str, Any]:
        return {"undone": [*ctx.data.get("undone", []), self.name]}

    def pause(self, ctx: StepContext) -> None:
        HOOK_CALLS.append(("pause", ctx.step))

    def resume(self, ctx: StepContext) -> None:
        HOOK_CALLS.append(("resume", ctx.step))


scripted = MachineType(
    name="scripted",
    steps=tuple(Scripted(n) for n in ("one", "two", "three", "four", "five")),
    retry=RetryPolicy(base_delay=0.05, max_delay=0.2, max_attempts=3, jitter=0.0),
)

scripted_async = MachineType(
    name="scripted_async",
    steps=tuple(Scripted(n) for n in ("one", "two", "three", "four", "five")),
    retry=RetryPolicy(base_delay=0.05, max_delay=0.2, max_attempts=3, jitter=0.0),
    execute_synchronously=False,
    lock_policy=LockPolicy.LOCAL,
)

scripted_batched = MachineType(
    name="scripted_batched",
    steps=tuple(Scripted(n) for n in ("one", "two", "three", "four", "five")),
    save_after_each_step=False,
)


class KillAfterStep(Hooks):
    """SIGKILLs this process right after the transition that completed `step` commits."""

    def __init__(self, step: str) -> None:
        self.after_step = step

    def transition(self, machine: Machine, entry: HistoryEntry) -> None:
        if entry.event == "step_succeeded" and entry.handler == self.after_step:
            os.kill(os.getpid(), signal.SIGKILL)
