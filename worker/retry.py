"""Retry policy and the pure backoff computation."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: base * 2**(attempt-1), capped at max_delay, with +-jitter."""

    base_delay: float = 1.0
    max_delay: float = 300.0
    max_attempts: int = 5
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if self.base_delay < 0 or self.max_delay < self.base_delay:
            raise ValueError("retry policy needs 0 <= base_delay <= max_delay")
        if self.max_attempts < 1:
            raise ValueError("retry policy needs max_attempts >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("retry policy jitter is a fraction between 0 and 1")


def compute_backoff(policy: RetryPolicy, attempt: int, rand: float | None = None) -> float:
    """Seconds to wait before attempt number `attempt + 1`, given `attempt` failures so far.

    `rand` in [0, 1) makes the jitter deterministic for tests; None draws one.
    """
    raw = policy.base_delay * float(2 ** max(attempt - 1, 0))
    capped = min(raw, policy.max_delay)
    draw: float = random.random() if rand is None else rand  # noqa: S311  # jitter, not security
    return max(0.0, capped * (1 + policy.jitter * (2 * draw - 1)))


def retries_exhausted(policy: RetryPolicy, attempt: int) -> bool:
    """True when `attempt` attempts have been made and no more are allowed."""
    return attempt >= policy.max_attempts
