"""`python -m bench.profile_engine`: the engine alone on one thread, for a sampling profiler.

Creates fresh bench machines, runs them with one Engine in the main thread (no Kafka) and
prints steps/s and this process's CPU per step. Profile it with, for example:

    .venv/bin/pip install py-spy
    .venv/bin/py-spy record --gil --format raw -o engine.txt -- \
        .venv/bin/python -m bench.profile_engine

`--gil` samples only while the thread holds the GIL, so database waits are left out.
"""

from __future__ import annotations

import argparse
import time

from bench.database import BenchDatabase
from bench.machines import STEPS
from worker.engine import Engine


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_engine")
    parser.add_argument("--machines", type=int, default=1500)
    parser.add_argument("--claim-limit", type=int, default=4)
    args = parser.parse_args()
    db = BenchDatabase()
    db.create()
    try:
        db.reset()
        db.create_machines(args.machines)
        store = db.store()
        engine = Engine(store, worker_id="profile")
        started, cpu_started = time.perf_counter(), time.process_time()
        while engine.run_due(limit=args.claim_limit):
            pass
        seconds = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
        steps = db.count_state("completed") * STEPS
        print(
            f"{steps} steps in {seconds:.1f} s: {steps / seconds:,.0f} steps/s, "
            f"{cpu / steps * 1000:.3f} ms CPU per step"
        )
        store.engine.dispose()
    finally:
        db.drop()


if __name__ == "__main__":
    main()
