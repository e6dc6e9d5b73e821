"""Machine types the daemon tests load with `--handlers tests.integration.daemon_sagas`.

`daemon_saga` has five steps and a local lock on its lookup key. It names no event topic,
so its events go to the worker's --event-topic, which each test makes unique. The machine's
data scripts the unusual paths:

- `"step_sleep": s`        every step sleeps s seconds first (to catch machines mid-run);
- `"hold_at": i`           step i asks for a retry in an hour on its first attempt, so the
                           machine waits in `retry` until a command moves it on;
- `"fail_at": i, "failures": n`  step i raises n times before it succeeds;
- `"rollback_at": i`       step i asks for a rollback.
"""

from __future__ import annotations

import time
from typing import Any

from worker import LockPolicy, MachineType, Retry, RetryPolicy, Rollback, StepContext, step
from worker.definition import Action

STEPS = 5
HOLD_SECONDS = 3600.0


def _forward(index: int) -> Action:
    def forward(ctx: StepContext) -> Retry | Rollback | dict[str, Any]:
        time.sleep(float(ctx.data.get("step_sleep", 0)))
        if ctx.data.get("hold_at") == index and ctx.attempt == 1:
            return Retry(error="held until a command arrives", delay=HOLD_SECONDS)
        if ctx.data.get("fail_at") == index and ctx.attempt <= int(ctx.data.get("failures", 0)):
            raise ConnectionError(f"step {index} failed on attempt {ctx.attempt}")
        if ctx.data.get("rollback_at") == index:
            return Rollback(reason=f"step {index} asked for a rollback")
        return {f"step{index}": "done"}

    return forward


def _backward(index: int) -> Action:
    def backward(ctx: StepContext) -> dict[str, Any]:
        del ctx
        return {f"step{index}": "compensated"}

    return backward


daemon_saga = MachineType(
    name="daemon_saga",
    steps=tuple(
        step(f"step{index}", _forward(index), backward=_backward(index)) for index in range(STEPS)
    ),
    lock_policy=LockPolicy.LOCAL,
    retry=RetryPolicy(base_delay=0.05, max_delay=0.5, max_attempts=5, jitter=0.1),
)
