"""`python -m bench`: every phase against the same MariaDB and Kafka, then one Markdown table.

Phases, in order (one progress line each on stderr):

1. raw      hand-written SQL on MySQLdb, per step UPDATE + INSERT + INSERT + COMMIT;
2. engine   the library in process, Engine threads over pre-created machines;
3. e2e      start commands on Kafka, 1 then 2 `smw worker` processes, events read back;
4. latency  2 workers at half the 2-worker throughput, rate-limited publishing;
5. soak     2 fresh workers at that rate for --soak seconds (default 120; `--soak 300` for
            the 5-minute soak), worker RSS sampled at start, middle and end.

Raw and engine run at concurrency 1 and 8, `--rounds` times each, alternating, and report
their best round: the host is shared and noisy, so compare ratios within one run only. A run
during which the database or the broker restarted is repeated.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from bench import e2e, engine_bench, raw
from bench.cpu import CpuMeter
from bench.database import BenchDatabase, Counters
from bench.machines import STEPS, bench_saga
from bench.raw import RunResult
from bench.report import (
    NOT_RUN,
    ROOT,
    Report,
    Row,
    cores,
    cpu_model,
    kafka_version,
    number,
    uname,
    utc_now,
    verdict,
    write,
)

T = TypeVar("T")
CONCURRENCIES = (1, 8)
ENGINE_TARGET = 0.8
E2E_TARGET = 0.6
P99_TARGET_MS = 250.0
RSS_TARGET_MB = 150.0
RSS_FLAT_FRACTION = 0.05
"""RSS is flat when the second half of the soak grows it by less than this fraction."""


def progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--machines", type=int, default=400, help="machines per raw/engine run")
    parser.add_argument("--rounds", type=int, default=2, help="raw/engine rounds (best is kept)")
    parser.add_argument(
        "--claim-limit", type=int, default=4, help="machines an engine thread claims at once"
    )
    parser.add_argument("--e2e-machines", type=int, default=1500, help="machines per e2e run")
    parser.add_argument(
        "--worker-concurrency", type=int, default=4, help="SMW_CONCURRENCY of each worker"
    )
    parser.add_argument(
        "--latency-seconds", type=float, default=30.0, help="length of the latency run"
    )
    parser.add_argument(
        "--soak",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="length of the memory soak (0 skips it); `--soak 300` for the 5-minute soak",
    )
    parser.add_argument("--skip-e2e", action="store_true", help="only the raw and engine phases")
    parser.add_argument(
        "--output", type=Path, default=ROOT / "bench" / "results" / "latest.md", help="report file"
    )
    parser.add_argument("--keep-db", action="store_true", help="leave the smw_bench database")
    return parser.parse_args(argv)


def cpu_per_step(cpu: dict[str, float], steps: int, client: str) -> str:
    """Client / database / Kafka CPU milliseconds per step ("-" where not measurable here)."""
    if not steps:
        return ""
    parts = [cpu.get(client), cpu.get("database"), cpu.get("kafka")]
    return " / ".join("-" if v is None else f"{v * 1000 / steps:.2f}" for v in parts)


class DisturbedError(RuntimeError):
    """A service restarted during a run (the host is shared); the run is repeated."""


def attempt(label: str, run: Callable[[], T], tries: int = 3) -> T:
    """Run a phase again when a service restart disturbed it or made it fail."""
    for number_of_try in range(1, tries + 1):
        try:
            result = run()
        except Exception as exc:
            if number_of_try == tries:
                raise
            progress(f"{label}: {type(exc).__name__}: {str(exc)[:160]}; again in 10 s")
            time.sleep(10)
            continue
        disturbed = getattr(result, "disturbed", None)
        if disturbed and number_of_try < tries:
            progress(f"{label}: {disturbed} during the run; running it again")
            continue
        return result
    raise AssertionError("unreachable")


def per_step(value: int, steps: int, digits: int = 2) -> str:
    return number(value / steps, digits) if steps else ""


def server_per_step(delta: Counters, steps: int) -> str:
    return (
        f"{per_step(delta.com_commit, steps)} commits, "
        f"{per_step(delta.questions + delta.admin_commands, steps)} round trips"
    )


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.db = BenchDatabase()
        self.report = Report()
        self.raw: dict[int, RunResult] = {}
        self.engine: dict[int, tuple[RunResult, engine_bench.RoundTrips]] = {}
        self.server: dict[str, Counters] = {}

    # -- raw and engine -------------------------------------------------------------------

    def run_in_process(self) -> None:
        for concurrency in CONCURRENCIES:
            for round_number in range(1, self.args.rounds + 1):
                for kind in ("raw", "engine"):
                    label = f"{kind} c={concurrency} round {round_number}"
                    attempt(label, lambda k=kind, c=concurrency: self._one_run(k, c))

    def _one_run(self, kind: str, concurrency: int) -> None:
        """One raw or engine run on fresh machines; keeps it if it is the best so far."""
        self.db.reset()
        ids = self.db.create_machines(self.args.machines)
        server = self.db.server_pid()
        meter = CpuMeter({"database": [server] if server else []})
        started = self.db.started_at()
        before = self.db.counters()
        if kind == "raw":
            result = raw.run(self.db, ids, concurrency, meter)
        else:
            outcome = engine_bench.run(
                self.db, ids, concurrency, claim_limit=self.args.claim_limit, meter=meter
            )
            result = outcome[0]
        delta = self.db.counters().minus(before)
        if abs(self.db.started_at() - started) > 5:
            raise DisturbedError("the database restarted")
        progress(f"{kind} c={concurrency}: {number(result.steps_per_second)} steps/s")
        if kind == "raw":
            best = self.raw.get(concurrency)
            if best is None or result.steps_per_second > best.steps_per_second:
                self.raw[concurrency] = result
                self.server[f"raw c={concurrency}"] = delta
        else:
            known = self.engine.get(concurrency)
            if known is None or result.steps_per_second > known[0].steps_per_second:
                self.engine[concurrency] = outcome
                self.server[f"engine c={concurrency}"] = delta

    def rows_in_process(self) -> None:
        rows = self.report.rows
        for concurrency in CONCURRENCIES:
            result = self.raw[concurrency]
            rows.append(
                Row(
                    phase="raw SQL (MySQLdb)",
                    concurrency=str(concurrency),
                    machines=str(result.machines),
                    seconds=number(result.seconds, 1),
                    steps_per_second=number(result.steps_per_second),
                    machines_per_second=number(result.steps_per_second / STEPS),
                    ratio="1.00",
                    commits_per_step=per_step(result.commits, result.steps),
                    round_trips_per_step=per_step(result.statements + result.commits, result.steps),
                    bytes_per_step=number(result.row_bytes),
                    cpu=cpu_per_step(result.cpu, result.steps, "bench"),
                )
            )
        for concurrency in CONCURRENCIES:
            result, counts = self.engine[concurrency]
            ratio = result.steps_per_second / self.raw[concurrency].steps_per_second
            rows.append(
                Row(
                    phase="engine (in process)",
                    concurrency=str(concurrency),
                    machines=str(result.machines),
                    seconds=number(result.seconds, 1),
                    steps_per_second=number(result.steps_per_second),
                    machines_per_second=number(result.steps_per_second / STEPS),
                    ratio=f"{ratio:.2f}x raw c={concurrency}",
                    commits_per_step=per_step(counts.commits, result.steps),
                    round_trips_per_step=per_step(counts.total, result.steps),
                    bytes_per_step=number(result.row_bytes),
                    cpu=cpu_per_step(result.cpu, result.steps, "bench"),
                    target=f">= {ENGINE_TARGET}x raw",
                    result=verdict(ratio >= ENGINE_TARGET),
                )
            )
        result, counts = self.engine[CONCURRENCIES[-1]]
        self.report.notes.append(
            f"engine round trips per step, counted with SQLAlchemy events at c="
            f"{CONCURRENCIES[-1]}: {per_step(counts.statements, result.steps)} statements + "
            f"{per_step(counts.commits, result.steps)} commits + "
            f"{per_step(counts.rollbacks + counts.pool_rollbacks, result.steps)} rollbacks + "
            f"{per_step(counts.pings, result.steps)} pre-pings (one per pool checkout); raw "
            "sends 3 statements + 1 commit. Per machine the engine also claims (one "
            f"transaction per {self.args.claim_limit} machines; this type takes no locks, so "
            "its start commits with its first step): 5 steps cost about 5.25 commits."
        )
        self.report.notes.append(
            "server-side cross-check (SHOW GLOBAL STATUS deltas / steps; they include every "
            "other client of the server): "
            + "; ".join(
                f"{name}: {server_per_step(delta, self._steps_of(name))}"
                for name, delta in self.server.items()
            )
        )

    def _steps_of(self, name: str) -> int:
        kind, _, conc = name.partition(" c=")
        if kind == "raw":
            return self.raw[int(conc)].steps
        return self.engine[int(conc)][0].steps

    # -- end to end -----------------------------------------------------------------------

    def run_e2e(self) -> None:
        rows = self.report.rows
        reason = e2e.require_worker()
        if reason is not None:
            progress(f"e2e skipped: {reason}")
            for phase in ("e2e, 1 worker", "e2e, 2 workers", "e2e latency", "soak"):
                rows.append(Row(phase=phase, result=f"{NOT_RUN}: {reason}"))
            return
        args = self.args
        logs = e2e.log_directory()
        background = e2e.background_questions(self.db)
        raw8 = self.raw[CONCURRENCIES[-1]].steps_per_second
        n = args.e2e_machines
        wc = args.worker_concurrency
        throughput: dict[int, e2e.RunReport] = {}
        for workers in (1, 2):

            def run(workers: int = workers) -> e2e.RunReport:
                with e2e.cluster(self.db, workers, wc, logs, f"w{workers}") as group:
                    return e2e.measure(group, n, warmup=4 * wc * workers, timeout=60 + n / 5)

            report = attempt(f"e2e {workers} worker(s)", run)
            throughput[workers] = report
            progress(
                f"e2e {workers} worker(s): {number(report.machines_per_second)} machines/s, "
                f"{number(report.steps_per_second)} steps/s"
            )
        rate = max(1.0, throughput[2].machines_per_second / 2)
        latency_count = max(10, int(rate * args.latency_seconds))

        def run_latency() -> e2e.RunReport:
            with e2e.cluster(self.db, 2, wc, logs, "latency") as group:
                return e2e.measure(
                    group,
                    latency_count,
                    rate=rate,
                    warmup=4 * wc * 2,
                    timeout=args.latency_seconds + 120,
                )

        latency = attempt("e2e latency", run_latency)
        progress(
            f"e2e latency at {number(rate, 1)} machines/s: p99 "
            f"{number(latency.percentile(0.99))} ms"
        )

        def run_soak() -> e2e.RunReport:
            with e2e.cluster(self.db, 2, wc, logs, "soak") as group:
                return e2e.measure(
                    group,
                    max(10, int(rate * args.soak)),
                    rate=rate,
                    warmup=4 * wc * 2,
                    timeout=args.soak + 120,
                )

        soak: e2e.RunReport | None = None
        if args.soak > 0:
            soak = attempt("soak", run_soak, tries=2)
            progress(
                f"soak {number(args.soak)} s at {number(rate, 1)} machines/s: RSS "
                f"{number(soak.rss_kb_at(0.0) / 1024, 1)} -> "
                f"{number(soak.rss_kb_at(1.0) / 1024, 1)} MB"
            )
        for workers, report in throughput.items():
            ratio = report.steps_per_second / raw8
            rows.append(
                Row(
                    phase=f"e2e, {workers} worker{'s' if workers > 1 else ''}",
                    concurrency=f"{workers} x {wc}",
                    machines=str(report.machines),
                    seconds=number(report.seconds, 1),
                    steps_per_second=number(report.steps_per_second),
                    machines_per_second=number(report.machines_per_second),
                    ratio=f"{ratio:.2f}x raw c={CONCURRENCIES[-1]}",
                    commits_per_step=per_step(report.server.com_commit, report.steps),
                    round_trips_per_step=per_step(
                        report.server.questions + report.server.admin_commands, report.steps
                    ),
                    cpu=cpu_per_step(report.cpu, report.steps, "workers"),
                    latency=_latency(report),
                    rss=number(report.steady_rss_kb() / 1024, 1),
                    target=f">= {E2E_TARGET}x raw c=8" if workers == 2 else "",
                    result=(verdict(ratio >= E2E_TARGET) if workers == 2 else "") + _flag(report),
                )
            )
        p99 = latency.percentile(0.99)
        rows.append(
            Row(
                phase=f"e2e latency at {number(rate, 1)} machines/s (half of max)",
                concurrency=f"2 x {wc}",
                machines=str(latency.machines),
                seconds=number(latency.seconds, 1),
                steps_per_second=number(latency.steps_per_second),
                machines_per_second=number(latency.machines_per_second),
                commits_per_step=per_step(latency.server.com_commit, latency.steps),
                round_trips_per_step=per_step(
                    latency.server.questions + latency.server.admin_commands, latency.steps
                ),
                cpu=cpu_per_step(latency.cpu, latency.steps, "workers"),
                latency=_latency(latency),
                rss=number(latency.steady_rss_kb() / 1024, 1),
                target=f"p99 < {P99_TARGET_MS:.0f} ms",
                result=verdict(p99 < P99_TARGET_MS) + _flag(latency),
            )
        )
        steady = max(r.steady_rss_kb() for r in (*throughput.values(), latency)) / 1024
        if soak is None:
            rows.append(
                Row(
                    phase="soak",
                    rss=number(steady, 1),
                    target=f"RSS < {RSS_TARGET_MB:.0f} MB and flat",
                    result=f"{NOT_RUN} (--soak 0); RSS {verdict(steady < RSS_TARGET_MB)}",
                )
            )
        else:
            start, middle, end = (soak.rss_kb_at(f) / 1024 for f in (0.0, 0.5, 1.0))
            peak = max(steady, soak.steady_rss_kb() / 1024, start, middle, end)
            flat = end - middle <= RSS_FLAT_FRACTION * middle
            rows.append(
                Row(
                    phase=f"soak {number(args.soak)} s at {number(rate, 1)} machines/s",
                    concurrency=f"2 x {wc}",
                    machines=str(soak.machines),
                    seconds=number(soak.seconds, 1),
                    steps_per_second=number(soak.steps_per_second),
                    machines_per_second=number(soak.machines_per_second),
                    cpu=cpu_per_step(soak.cpu, soak.steps, "workers"),
                    latency=_latency(soak),
                    rss=f"{start:.1f} / {middle:.1f} / {end:.1f} (start / middle / end)",
                    target=f"RSS < {RSS_TARGET_MB:.0f} MB and flat",
                    result=(
                        f"{verdict(peak < RSS_TARGET_MB and flat)}: peak {peak:.1f} MB, "
                        f"{'flat' if flat else 'grows'} ({end - middle:+.1f} MB in the "
                        "second half)"
                    )
                    + _flag(soak),
                )
            )
        self.report.notes.append(
            "e2e commits and round trips per step are MariaDB global status deltas (Com_commit; "
            "Questions + Com_admin_commands, which counts pings) over the measured window, "
            "divided by steps; other clients of the server add to them (idle background just "
            f"before: {number(background, 1)} statements/s)."
        )
        self.report.notes.append(
            "e2e latency runs from the command's publish (its `sent_at`) to this process "
            "consuming the machine's `completed` event; the throughput runs publish all "
            f"{n} commands at once, so their latency is mostly queueing. Worker logs: {logs}"
        )

    # -- all ------------------------------------------------------------------------------

    def facts(self, wall: float) -> None:
        self.report.facts = [
            ("date", utc_now()),
            ("host", f"{uname()}; {cpu_model()}; {cores()} cores"),
            ("database", f"MariaDB/MySQL {self.db.version()} ({self.db.durability()})"),
            ("kafka", kafka_version(e2e.kafka_bootstrap())),
            (
                "workload",
                (
                    f"`{bench_saga.name}`: {STEPS} trivial steps, no locks, default event "
                    "topic, about 90 bytes of JSON data; steps/s counts step executions"
                ),
            ),
            (
                "runs",
                (
                    f"raw/engine: {self.args.machines} machines per run, best of "
                    f"{self.args.rounds} alternating rounds, engine claim limit "
                    f"{self.args.claim_limit}; e2e: {self.args.e2e_machines} machines per "
                    f"throughput run, {self.args.worker_concurrency} executor threads per worker"
                ),
            ),
            ("bench wall time", f"{wall:.0f} s"),
        ]

    def run(self) -> str:
        began = time.monotonic()
        progress(f"database {self.db.name} on {self.db.server.render_as_string()}")
        self.db.create()
        try:
            self.run_in_process()
            self.rows_in_process()
            if self.args.skip_e2e:
                progress("e2e skipped (--skip-e2e)")
            else:
                self.run_e2e()
            self.facts(time.monotonic() - began)
        finally:
            if not self.args.keep_db:
                self.db.drop()
        text = write(self.report, self.args.output)
        progress(f"wrote {os.path.relpath(self.args.output, Path.cwd())}")
        return text


def _flag(report: e2e.RunReport) -> str:
    return f" (disturbed: {report.disturbed} during the run)" if report.disturbed else ""


def _latency(report: e2e.RunReport) -> str:
    return " / ".join(number(report.percentile(p)) for p in (0.5, 0.95, 0.99))


def main(argv: list[str] | None = None) -> int:
    print(Bench(parse(argv)).run(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
