"""The machine type every benchmark phase runs: five trivial steps, no locks, default topic.

`smw worker --handlers bench.machines` loads it, so the end-to-end phase runs the same type.
"""

from __future__ import annotations

from typing import Any

from worker import LockPolicy, MachineType, StepContext, step

STEP_NAMES = ("reserve", "charge", "pack", "ship", "notify")
"""Five steps; each adds one small key to the data."""


def _mark(ctx: StepContext) -> dict[str, Any]:
    return {ctx.step: ctx.step_index + 1}


bench_saga = MachineType(
    name="bench_saga",
    steps=tuple(step(name, _mark) for name in STEP_NAMES),
    lock_policy=LockPolicy.NONE,
    event_topic=None,
)

STEPS = len(bench_saga.steps)


def initial_data(index: int, sent_at: float) -> dict[str, Any]:
    """The small JSON object each machine starts with (about 80 bytes).

    `sent_at` is the wall-clock time the machine was asked for; the end-to-end phase measures
    latency from it to the terminal event, the other phases carry it so the sizes match.
    """
    return {"order": f"o-{index:08d}", "amount": 4200 + index % 100, "items": 3, "sent_at": sent_at}
