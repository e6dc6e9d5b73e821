"""State Machine Worker: durable step-based state machines driven by Kafka, stored in MySQL."""

from worker.definition import (
    Direction,
    LockPolicy,
    MachineType,
    Registry,
    Step,
    StepContext,
    step,
)
from worker.errors import WorkerError
from worker.outcomes import Cancel, Complete, Fail, Park, Pause, Retry, Rollback, Success
from worker.retry import RetryPolicy
from worker.states import Event, State

__version__ = "0.1.0"

__all__ = [
    "Cancel",
    "Complete",
    "Direction",
    "Event",
    "Fail",
    "LockPolicy",
    "MachineType",
    "Park",
    "Pause",
    "Registry",
    "Retry",
    "RetryPolicy",
    "Rollback",
    "State",
    "Step",
    "StepContext",
    "Success",
    "WorkerError",
    "__version__",
    "step",
]
