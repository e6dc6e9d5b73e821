"""`python -m tests.chaos [--machines N] [--duration S] [--workers N] [--no-restarts] ...`

Runs the chaos scenario against the MariaDB server of SMW_DATABASE_URL and the Kafka broker
of SMW_KAFKA_BOOTSTRAP (`make services` starts both), prints the report and exits 0 only if
every invariant holds (1 otherwise, 2 for bad arguments).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tests.chaos.harness import CannotRestartError, Options, run


def parse(argv: list[str]) -> tuple[Options, Path | None]:
    parser = argparse.ArgumentParser(
        prog="python -m tests.chaos",
        description="Kill workers, restart MariaDB and Kafka, then check the invariants.",
    )
    default = Options()
    parser.add_argument("--machines", type=int, default=default.machines)
    parser.add_argument("--accounts", type=int, default=default.accounts)
    parser.add_argument("--workers", type=int, default=default.workers)
    parser.add_argument(
        "--duration", type=float, default=default.duration, help="seconds of SIGKILLs"
    )
    parser.add_argument("--no-restarts", action="store_true", help="restart neither service")
    parser.add_argument("--no-db-restart", action="store_true")
    parser.add_argument("--no-kafka-restart", action="store_true")
    parser.add_argument(
        "--db-outage",
        type=float,
        default=0.0,
        help="keep MariaDB down this many seconds instead of a plain restart",
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--lease-seconds", type=float, default=default.lease_seconds)
    parser.add_argument("--concurrency", type=int, default=default.concurrency)
    parser.add_argument("--settle-timeout", type=float, default=default.settle_timeout)
    parser.add_argument(
        "--keep", action="store_true", help="keep the database, topics and logs after a pass"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    if args.machines < 1 or args.workers < 1 or args.accounts < 1 or args.duration <= 0:
        parser.error("--machines, --accounts, --workers and --duration must be positive")
    options = Options(
        machines=args.machines,
        accounts=args.accounts,
        workers=args.workers,
        duration=args.duration,
        db_restart=not (args.no_restarts or args.no_db_restart),
        kafka_restart=not (args.no_restarts or args.no_kafka_restart),
        db_outage=args.db_outage,
        seed=args.seed,
        lease_seconds=args.lease_seconds,
        concurrency=args.concurrency,
        settle_timeout=args.settle_timeout,
        keep=args.keep,
    )
    return options, args.json


def main(argv: list[str] | None = None) -> int:
    options, json_path = parse(sys.argv[1:] if argv is None else argv)
    try:
        report = run(options)
    except CannotRestartError as exc:
        print(
            f"error: {exc}; use --no-restarts, --no-db-restart or --no-kafka-restart",
            file=sys.stderr,
        )
        return 2
    print(report.text())
    if json_path is not None:
        json_path.write_text(json.dumps(report.as_dict(), indent=2), encoding="utf-8")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
