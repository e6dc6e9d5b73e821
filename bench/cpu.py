"""CPU seconds used by this process, the worker processes and the local servers.

On a small shared host the phases are CPU-bound, so CPU per step explains the ratios better
than wall time does. Server processes are found only when they run on this host.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def process_seconds(pid: int) -> float | None:
    """User plus system CPU seconds of a process, or None if it is gone or not readable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / TICKS


def pid_from_file(path: Path, names: Iterable[str]) -> int | None:
    """The pid in `path` if that process runs here and its command is one of `names`."""
    try:
        pid = int(path.read_text().split()[0])
        command = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError, IndexError):
        return None
    return pid if command in set(names) else None


@dataclass(frozen=True)
class Snapshot:
    own: float
    others: dict[str, float]


class CpuMeter:
    """Measures CPU seconds of this process and of named other processes over a window."""

    def __init__(self, others: dict[str, list[int]] | None = None) -> None:
        self.others = {name: pids for name, pids in (others or {}).items() if pids}

    def snapshot(self) -> Snapshot:
        return Snapshot(
            own=time.process_time(),
            others={
                name: sum(process_seconds(pid) or 0.0 for pid in pids)
                for name, pids in self.others.items()
            },
        )

    @staticmethod
    def used(before: Snapshot, after: Snapshot) -> dict[str, float]:
        spent = {"bench": after.own - before.own}
        for name, seconds in after.others.items():
            spent[name] = seconds - before.others.get(name, seconds)
        return spent


def timed_threads(
    workers: Sequence[Callable[[threading.Barrier], None]],
    meter: CpuMeter,
    *,
    on_start: Callable[[], None] | None = None,
) -> tuple[float, dict[str, float]]:
    """Run each worker on a thread of its own; wall seconds and CPU from the moment every
    worker has set itself up and waited on the barrier it is given, until the last ends.

    `on_start` runs as the clock starts. A worker's failure aborts the barrier and is
    raised here once every thread has ended.
    """
    ready = threading.Barrier(len(workers) + 1)
    errors: list[BaseException] = []

    def guarded(worker: Callable[[threading.Barrier], None]) -> None:
        try:
            worker(ready)
        except Exception as exc:  # noqa: BLE001  # re-raised by the caller's thread below
            ready.abort()
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(w,)) for w in workers]
    for thread in threads:
        thread.start()
    ready.wait()
    if on_start is not None:
        on_start()
    cpu_before = meter.snapshot()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    cpu = meter.used(cpu_before, meter.snapshot())
    if errors:
        raise errors[0]
    return seconds, cpu
