"""What a step action returns. Each outcome is a plain value; none of them is an error.

A handler may also return None (success with no data changes) or a dict (success, merged
into the data). Raising an exception counts as a retryable failure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Success:
    """Move to the next step, merging `data` into the machine's data."""

    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Complete:
    """Finish the machine now, skipping the remaining steps."""

    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Fail:
    """Stop the machine as failed."""

    error: str


@dataclass(frozen=True)
class Retry:
    """Try this step again, after `delay` seconds or after the retry policy's backoff."""

    error: str = "retry requested"
    delay: float | None = None


@dataclass(frozen=True)
class Rollback:
    """Start compensating the steps that completed, newest first."""

    reason: str = "rollback requested"


@dataclass(frozen=True)
class Pause:
    """Pause the machine after this step; a resume command continues it."""

    reason: str = "pause requested"


@dataclass(frozen=True)
class Cancel:
    """Cancel the machine; nothing is compensated."""

    reason: str = "cancel requested"


@dataclass(frozen=True)
class Park:
    """An unknown situation: stop and wait for an operator."""

    reason: str


@dataclass(frozen=True)
class Raised:
    """The action raised an exception; the engine treats it as a retryable failure."""

    error: str


Outcome = Success | Complete | Fail | Retry | Rollback | Pause | Cancel | Park | Raised


def as_outcome(returned: object) -> Outcome:
    """Normalise what a handler returned into an Outcome."""
    if returned is None:
        return Success()
    if isinstance(returned, dict):
        return Success(data=returned)
    if isinstance(returned, Success | Complete | Fail | Retry | Rollback | Pause | Cancel | Park):
        return returned
    return Fail(
        error=f"handler returned {type(returned).__name__}; expected None, a dict or an outcome"
    )
