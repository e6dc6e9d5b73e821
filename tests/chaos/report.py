"""Reading back a chaos run and checking the invariants the README guarantees.

The invariants, each one a `Check`:

1. every machine is terminal, in the state its script leads to;
2. its history follows the script: the steps done, the rollback and the compensations;
3. each machine's history has sequence numbers 1..n, none missing, none twice;
4. the event ids read back from Kafka are the EventIDs in STATE_MACHINE_HISTORY (repeats
   allowed and counted; none missing, none that no committed transition wrote);
5. no two machines of one account held its lock at once, by the history's started ->
   terminal rows (by time and by commit order);
6. nor by the step executions recorded in CHAOS_STEP_RUN;
7. each step action (machine, step, direction, attempt) ran at most 1 + the faults that hit
   it: an execution whose process never committed its outcome must be explained by a
   SIGKILL of that process, the MariaDB restart, or that worker losing the machine;
8. each command was applied once: one PROCESSED_COMMAND row and one `created` per machine;
9. no command was dead-lettered except the redelivered repeat of one already applied;
10. a worker that started exits only when killed, and with 0 on SIGTERM (one may fail to
    start while MariaDB is down: it never logged `worker.started`);
11. the harness itself did what it meant to: restarts succeeded, every command reached Kafka.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter, defaultdict
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from tests.chaos.harness import TERMINAL, Outcome, Restart
from tests.chaos.machines import PATH_EVENTS, TYPE_NAME, direction_of, step_run
from worker import tables

SHOWN = 8
"""Problems listed per check; the rest are counted."""
STARTUP_GRACE = 20.0
"""Seconds after MariaDB is back during which a worker may still fail its start-up."""


@dataclass
class Check:
    name: str
    ok: bool
    summary: str
    problems: list[str] = field(default_factory=list)


@dataclass
class Report:
    checks: list[Check]
    numbers: list[tuple[str, str]]
    kills: list[str]
    notes: list[str]
    seed: int
    suffix: str

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def text(self) -> str:
        lines = [f"== chaos report: run {self.suffix}, seed {self.seed} =="]
        width = max(len(k) for k, _ in self.numbers)
        lines.extend(f"{k.ljust(width)}  {v}" for k, v in self.numbers)
        lines.append("invariants:")
        for check in self.checks:
            lines.append(f"  [{'ok' if check.ok else 'FAIL'}] {check.name}: {check.summary}")
            lines.extend(f"         - {p}" for p in check.problems[:SHOWN])
            if len(check.problems) > SHOWN:
                lines.append(f"         ... and {len(check.problems) - SHOWN} more")
        if self.kills:
            lines.append("kills (when, worker, lived; steps in flight = executed, not committed):")
            lines.extend(f"  {k}" for k in self.kills)
        lines.extend(f"note: {n}" for n in self.notes)
        broken = len(self.failures)
        lines.append(
            f"result: PASS, all {len(self.checks)} invariants hold"
            if broken == 0
            else f"result: FAIL, {broken} of {len(self.checks)} invariants broken"
        )
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "seed": self.seed,
            "run": self.suffix,
            "numbers": dict(self.numbers),
            "checks": [
                {"name": c.name, "ok": c.ok, "summary": c.summary, "problems": c.problems}
                for c in self.checks
            ],
            "kills": self.kills,
            "notes": self.notes,
        }


# -- reading back --------------------------------------------------------------------------


@dataclass(frozen=True)
class LogEvent:
    at: datetime
    event: str
    level: str
    machine_id: str | None


def worker_log(path: Path) -> list[LogEvent]:
    found = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        with suppress(ValueError, KeyError, TypeError):
            record = json.loads(line)
            found.append(
                LogEvent(
                    datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")),
                    str(record["event"]),
                    str(record.get("level", "")),
                    record.get("machine_id"),
                )
            )
    return found


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _overlaps(holds: dict[str, list[tuple[Any, Any, str]]]) -> list[str]:
    found = []
    for key, intervals in holds.items():
        intervals.sort()
        for before, after in itertools.pairwise(intervals):
            if after[0] < before[1]:
                found.append(f"{key}: {before[2]} [{before[0]}, {before[1]}] overlaps {after[2]}")
    return found


# -- the analysis --------------------------------------------------------------------------


def analyze(o: Outcome) -> Report:
    db = o.world.engine
    table = tables.machine_table(TYPE_NAME)
    h, p = tables.history, tables.processed_command
    with db.connect() as conn:
        states = {
            r.ID: r.CurrentState
            for r in conn.execute(sa.select(table.c.ID, table.c.CurrentState)).all()
        }
        history = list(conn.execute(sa.select(h).order_by(h.c.ID)).all())
        runs = list(conn.execute(sa.select(step_run).order_by(step_run.c.ID)).all())
        processed = list(
            conn.execute(sa.select(p.c.CommandID, p.c.StateMachineID, p.c.Outcome)).all()
        )
    by_machine: dict[str, list[Any]] = defaultdict(list)
    for row in history:
        by_machine[row.StateMachineID].append(row)
    planned = {m.machine_id: m for m in o.planned}
    logs = {run.pid: worker_log(run.log_path) for run in o.fleet.runs if run.log_path.exists()}
    worker_of = {run.pid: run.worker_id for run in o.fleet.runs}

    checks = [
        _outcomes(o, states),
        _paths(o, by_machine),
        _sequences(by_machine, planned),
    ]
    events_check, event_numbers = _events(o, history)
    checks.append(events_check)
    checks.extend(_history_holds(by_machine, planned))
    checks.append(_run_holds(runs, planned))
    runs_check, orphans = _executions(o, runs, history, worker_of, logs)
    checks.append(runs_check)
    checks.append(_commands(o, processed, history))
    checks.append(_dead_letters(o))
    checks.append(_workers(o))
    checks.append(_harness(o))

    numbers = _numbers(
        o, history=history, runs=runs, orphans=orphans, events=event_numbers, logs=logs
    )
    kills = _kill_lines(o, orphans)
    return Report(checks, numbers, kills, list(o.notes), o.seed, o.suffix)


def _outcomes(o: Outcome, states: dict[str, str]) -> Check:
    problems = [
        f"{m.machine_id} ({m.script}): expected {m.expected_state}, "
        f"found {states.get(m.machine_id, 'no machine')}"
        for m in o.planned
        if states.get(m.machine_id) != m.expected_state
    ]
    expected = Counter(m.expected_state for m in o.planned)
    return Check(
        "every machine terminal with the outcome its script expects",
        not problems,
        f"{len(o.planned) - len(problems)}/{len(o.planned)} as expected "
        f"({', '.join(f'{k} {v}' for k, v in sorted(expected.items()))})",
        problems,
    )


def _paths(o: Outcome, by_machine: dict[str, list[Any]]) -> Check:
    problems = []
    for m in o.planned:
        path = tuple(
            (r.Event, r.Handler) for r in by_machine.get(m.machine_id, []) if r.Event in PATH_EVENTS
        )
        if path != m.expected_path:
            problems.append(
                f"{m.machine_id} ({m.script}): expected {_path(m.expected_path)}, "
                f"found {_path(path)}"
            )
    return Check(
        "history follows each script (steps done, rollback, compensations, each once)",
        not problems,
        f"{len(o.planned) - len(problems)}/{len(o.planned)} match",
        problems,
    )


def _path(path: Iterable[tuple[str, str | None]]) -> str:
    return " ".join(f"{event}:{handler}" for event, handler in path) or "(none)"


def _sequences(by_machine: dict[str, list[Any]], planned: dict[str, Any]) -> Check:
    problems = []
    for machine_id in sorted(set(by_machine) | set(planned)):
        sequences = [r.Sequence for r in by_machine.get(machine_id, [])]
        if sorted(sequences) != list(range(1, len(sequences) + 1)) or not sequences:
            dupes = sorted(s for s, n in Counter(sequences).items() if n > 1)
            problems.append(f"{machine_id}: sequences {sorted(sequences)} (repeated {dupes})")
    rows = sum(len(v) for v in by_machine.values())
    return Check(
        "history sequence numbers 1..n per machine, none missing or repeated",
        not problems,
        f"{rows} history rows over {len(by_machine)} machines",
        problems,
    )


def _events(o: Outcome, history: list[Any]) -> tuple[Check, dict[str, int]]:
    consumed: list[str] = []
    rejections = 0
    undecodable = 0
    for message in o.events:
        try:
            event = json.loads(message.value() or b"")
        except ValueError:
            undecodable += 1
            continue
        if event.get("sequence") == 0:
            rejections += 1
            continue
        consumed.append(str(event.get("event_id")))
    committed = {r.EventID for r in history}
    seen = set(consumed)
    missing = sorted(committed - seen)
    phantom = sorted(seen - committed)
    duplicates = len(consumed) - len(seen)
    problems = [f"missing from Kafka: {e}" for e in missing[:SHOWN]]
    problems += [f"on Kafka but never committed: {e}" for e in phantom[:SHOWN]]
    if undecodable:
        problems.append(f"{undecodable} event messages are not JSON")
    numbers = {
        "consumed": len(consumed),
        "duplicates": duplicates,
        "rejections": rejections,
        "missing": len(missing),
        "phantom": len(phantom),
    }
    return (
        Check(
            "event ids on Kafka == EventIDs in STATE_MACHINE_HISTORY",
            not missing and not phantom and not undecodable,
            f"{len(committed)} committed, {len(consumed)} read ({duplicates} repeats), "
            f"{len(missing)} missing, {len(phantom)} phantom, {rejections} rejection events",
            problems,
        ),
        numbers,
    )


def _history_holds(by_machine: dict[str, list[Any]], planned: dict[str, Any]) -> list[Check]:
    by_time: dict[str, list[tuple[Any, Any, str]]] = defaultdict(list)
    by_commit: dict[str, list[tuple[Any, Any, str]]] = defaultdict(list)
    far = datetime.max  # noqa: DTZ901  # compared with naive UTC columns
    for machine_id, rows in by_machine.items():
        started = [r for r in rows if r.Event == "started"]
        ended = [r for r in rows if r.ToState in TERMINAL]
        if not started:
            continue
        key = planned[machine_id].lookup_key if machine_id in planned else "?"
        end_time = ended[-1].OccurredTimestamp if ended else far
        end_id = ended[-1].ID if ended else 1 << 62
        by_time[key].append((started[0].OccurredTimestamp, end_time, machine_id))
        by_commit[key].append((started[0].ID, end_id, machine_id))
    time_problems = _overlaps(by_time)
    commit_problems = _overlaps(by_commit)
    holds = sum(len(v) for v in by_time.values())
    return [
        Check(
            "no two lock holds overlap on an account (history: started -> terminal)",
            not time_problems and not commit_problems,
            f"{holds} holds on {len(by_time)} accounts; overlaps by time {len(time_problems)}, "
            f"by commit order {len(commit_problems)}",
            time_problems + commit_problems,
        )
    ]


def _run_holds(runs: list[Any], planned: dict[str, Any]) -> Check:
    spans: dict[str, list[datetime]] = defaultdict(list)
    keys: dict[str, str] = {}
    for run in runs:
        spans[run.MachineID].append(run.StartedAt)
        spans[run.MachineID].append(run.EndedAt or run.StartedAt)
        keys[run.MachineID] = run.LookupKey
    holds: dict[str, list[tuple[Any, Any, str]]] = defaultdict(list)
    for machine_id, times in spans.items():
        holds[keys[machine_id]].append((min(times), max(times), machine_id))
    problems = _overlaps(holds)
    unplanned = sorted(set(spans) - set(planned))
    problems += [f"{m}: executions recorded for a machine never started" for m in unplanned]
    return Check(
        "no two lock holds overlap on an account (step executions in CHAOS_STEP_RUN)",
        not problems,
        f"{len(runs)} executions of {len(spans)} machines on {len(holds)} accounts; "
        f"{len(problems)} overlaps",
        problems,
    )


@dataclass(frozen=True)
class Orphan:
    """An execution whose process never committed the transition it led to."""

    machine_id: str
    step: int
    direction: str
    attempt: int
    pid: int
    started: datetime
    cause: str


def _executions(
    o: Outcome,
    runs: list[Any],
    history: list[Any],
    worker_of: dict[int, str],
    logs: dict[int, list[LogEvent]],
) -> tuple[Check, list[Orphan]]:
    committed = Counter(
        (r.StateMachineID, r.Handler, direction_of(r.FromState), r.Attempt, r.WorkerID)
        for r in history
        if r.Handler is not None
    )
    killed = {k.pid for k in o.fleet.kills}
    crashed = {r.pid for r in o.fleet.runs if r.end == "exited"}
    outages = [_outage_window(o, r) for r in o.restarts if r.service == "mariadb"]
    groups: dict[tuple[str, int, str, int], list[Any]] = defaultdict(list)
    by_process: dict[tuple[str, int, str, int, int], list[Any]] = defaultdict(list)
    for run in runs:
        groups[(run.MachineID, run.Step, run.Direction, run.Attempt)].append(run)
        by_process[(run.MachineID, run.Step, run.Direction, run.Attempt, run.Pid)].append(run)
    orphans = []
    for (machine_id, step, direction, attempt, pid), found in by_process.items():
        worker_id = worker_of.get(pid, f"pid{pid}")
        # Each committed row accounts for one execution, the latest; any earlier ones by the
        # same process never led to a commit (the process gave the machine up, then ran it
        # again once it had claimed it anew).
        done = committed[(machine_id, f"step{step}", direction, attempt, worker_id)]
        for run in found[: max(0, len(found) - done)]:
            cause = _cause(
                o,
                run=run,
                killed=killed,
                crashed=crashed,
                outages=outages,
                log=logs.get(pid, []),
            )
            orphans.append(Orphan(machine_id, step, direction, attempt, pid, run.StartedAt, cause))
    explained: Counter[tuple[str, int, str, int]] = Counter(
        (x.machine_id, x.step, x.direction, x.attempt) for x in orphans if x.cause != "unexplained"
    )
    problems = []
    for key, found in groups.items():
        allowed = 1 + explained[key]
        if len(found) > allowed:
            machine_id, step, direction, attempt = key
            pids = ", ".join(str(r.Pid) for r in found)
            problems.append(
                f"{machine_id} step{step} {direction} attempt {attempt} ran {len(found)} times "
                f"(allowed {allowed}; pids {pids})"
            )
    unexplained = [x for x in orphans if x.cause == "unexplained"]
    problems += [
        f"{x.machine_id} step{x.step} {x.direction} attempt {x.attempt}: pid {x.pid} ran it at "
        f"{x.started} and never committed its outcome, with no fault to explain it"
        for x in unexplained
    ]
    repeated = sum(1 for found in groups.values() if len(found) > 1)
    causes = Counter(x.cause for x in orphans)
    return (
        Check(
            "each step ran at most 1 + (faults that hit it) times",
            not problems,
            f"{len(runs)} executions of {len(groups)} step attempts; {repeated} re-ran; "
            f"uncommitted executions by cause: "
            + (", ".join(f"{c} {n}" for c, n in sorted(causes.items())) or "none"),
            problems,
        ),
        orphans,
    )


def _outage_window(o: Outcome, restart: Restart) -> tuple[datetime, datetime]:
    up = restart.up if restart.up is not None else o.clock.now()
    return (
        o.clock.wall(restart.began - 2.0),
        o.clock.wall(up + o.options.lease_seconds + 5.0),
    )


def _cause(
    o: Outcome,
    *,
    run: Any,
    killed: set[int],
    crashed: set[int],
    outages: list[tuple[datetime, datetime]],
    log: list[LogEvent],
) -> str:
    if run.Pid in killed:
        return "killed"
    if run.Pid in crashed:
        return "worker exited"
    started = _utc(run.StartedAt)
    if any(begin <= started <= end for begin, end in outages):
        return "database restart"
    lost = {"machine.stale_write", "executor.store_unavailable", "executor.failed"}
    horizon = o.options.lease_seconds * 3
    for event in log:
        if event.event not in lost:
            continue
        if event.machine_id not in (None, run.MachineID):
            continue
        if 0 <= (event.at - started).total_seconds() <= horizon:
            return f"lost the machine ({event.event})"
    return "unexplained"


def _commands(o: Outcome, processed: list[Any], history: list[Any]) -> Check:
    sent = Counter(m.command_id for m in o.planned)
    recorded = Counter(r.CommandID for r in processed)
    problems = [
        f"{c}: sent once, applied {recorded.get(c, 0)} times" for c in sent if recorded[c] != 1
    ]
    problems += [f"{c}: applied but never sent" for c in recorded if c not in sent]
    problems += [f"{r.CommandID}: outcome {r.Outcome}" for r in processed if r.Outcome != "applied"]
    created = Counter(r.StateMachineID for r in history if r.Event == "created")
    problems += [
        f"{m.machine_id}: {created.get(m.machine_id, 0)} `created` rows"
        for m in o.planned
        if created.get(m.machine_id, 0) != 1
    ]
    planned_ids = {m.machine_id for m in o.planned}
    problems += [f"{m}: created but never planned" for m in created if m not in planned_ids]
    return Check(
        "no command applied twice (one PROCESSED_COMMAND row and one `created` per machine)",
        not problems,
        f"{len(sent)} sent, {len(recorded)} recorded, {sum(created.values())} created rows",
        problems,
    )


def _dead_letters(o: Outcome) -> Check:
    reasons: Counter[str] = Counter()
    problems = []
    for message in o.dead_letters:
        headers = {
            str(k): bytes(v or b"").decode("utf-8", "replace") for k, v in message.headers() or []
        }
        reason = headers.get("smw.reason", "?")
        reasons[reason] += 1
        if reason != "duplicate_command":
            problems.append(
                f"{(message.key() or b'').decode('utf-8', 'replace')}: {reason}: "
                f"{headers.get('smw.reason.detail', '')[:200]}"
            )
    return Check(
        "no valid command dead-lettered (only redelivered repeats, as duplicate_command)",
        not problems,
        ", ".join(f"{r} {n}" for r, n in sorted(reasons.items())) or "dead-letter topic empty",
        problems,
    )


def _workers(o: Outcome) -> Check:
    windows = [
        (r.began, (r.up if r.up is not None else o.clock.now()) + STARTUP_GRACE)
        for r in o.restarts
        if r.service == "mariadb"
    ]
    problems = []
    for run in o.fleet.runs:
        if run.end == "exited":
            ended = run.ended or 0.0
            started = any(e.event == "worker.started" for e in worker_log(run.log_path))
            if started or not any(begin <= ended <= end for begin, end in windows):
                problems.append(
                    f"{run.worker_id} (pid {run.pid}) exited by itself with {run.code} at "
                    f"t={ended:.1f}s: {_last_error(run.log_path)}"
                )
        elif run.end == "stopped" and run.code != 0:
            problems.append(
                f"{run.worker_id} (pid {run.pid}) exited {run.code} on SIGTERM: "
                f"{_last_error(run.log_path)}"
            )
    exited = sum(1 for r in o.fleet.runs if r.end == "exited")
    stopped = [r for r in o.fleet.runs if r.end == "stopped"]
    return Check(
        "workers exit only when killed (or fail to start while MariaDB is down); SIGTERM exits 0",
        not problems,
        f"{len(o.fleet.runs)} started, {len(o.fleet.kills)} killed, {exited} exited by "
        f"themselves, {len(stopped)} stopped with codes "
        f"{sorted(Counter(r.code for r in stopped).items())}",
        problems,
    )


def _last_error(path: Path) -> str:
    with suppress(OSError):
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        for line in reversed(lines):
            if '"error"' in line or "error:" in line or "Traceback" in line:
                return line[:300]
        return lines[-1][:300] if lines else "(empty log)"
    return "(no log)"


def _harness(o: Outcome) -> Check:
    problems = [
        f"{r.service} restart exited {r.code}: {r.output[-300:]}" for r in o.restarts if r.code != 0
    ]
    wanted = {"mariadb"} if o.options.db_restart else set()
    if o.options.kafka_restart:
        wanted.add("kafka")
    done = {r.service for r in o.restarts}
    problems += [f"{s} was never restarted" for s in sorted(wanted - done)]
    publisher = o.publisher
    if publisher.error:
        problems.append(f"publisher failed: {publisher.error}")
    if publisher.delivered != len(o.planned):
        problems.append(f"{publisher.delivered} of {len(o.planned)} commands acknowledged")
    problems += publisher.failures[:SHOWN]
    if o.settled_at is None:
        problems.append(f"not every machine was terminal {o.options.settle_timeout:.0f}s after")
    return Check(
        "the run itself: restarts done, every command acknowledged by Kafka, settled in time",
        not problems,
        f"restarts {', '.join(f'{r.service} exit {r.code}' for r in o.restarts) or 'none'}; "
        f"{publisher.delivered}/{len(o.planned)} commands acknowledged",
        problems,
    )


# -- numbers -------------------------------------------------------------------------------


def _numbers(
    o: Outcome,
    *,
    history: list[Any],
    runs: list[Any],
    orphans: list[Orphan],
    events: dict[str, int],
    logs: dict[int, list[LogEvent]],
) -> list[tuple[str, str]]:
    scripts = Counter(m.script for m in o.planned)
    accounts = len({m.lookup_key for m in o.planned})
    groups = Counter((r.MachineID, r.Step, r.Direction, r.Attempt) for r in runs)
    hit_kills = {x.pid for x in orphans if x.cause == "killed"}
    exited = sum(1 for r in o.fleet.runs if r.end == "exited")
    settled = o.settled_at if o.settled_at is not None else o.stopped_at
    warnings = Counter(
        e.event for log in logs.values() for e in log if e.level in ("warning", "error")
    )
    kills = (
        f"{len(o.fleet.kills)} SIGKILLs over {o.options.duration:g}s; {len(hit_kills)} hit "
        f"a step in flight ({sum(1 for x in orphans if x.cause == 'killed')} steps)"
    )
    workers = (
        f"{o.options.workers} at a time, lease {o.options.lease_seconds:g}s; "
        f"{len(o.fleet.runs)} processes started"
    )
    transitions = (
        f"{len(history)} transitions; {sum(r.Event == 'lock_waiting' for r in history)} "
        f"lock waits; {sum(r.Event == 'retry_scheduled' for r in history)} retries "
        f"scheduled; {len(history) / max(settled, 1e-9):.1f} transitions/s"
    )
    read = (
        f"{events['consumed']} read from Kafka, {events['duplicates']} duplicates, "
        f"{events['rejections']} rejections"
    )
    executions = (
        f"{len(runs)} for {len(groups)} step attempts; "
        f"{sum(1 for n in groups.values() if n > 1)} re-executed "
        f"({sum(n - 1 for n in groups.values() if n > 1)} extra runs)"
    )
    settled_text = f"{o.settled_at:.1f}s" if o.settled_at is not None else "never (timeout)"
    timings = (
        f"kills for {o.chaos_ended:.1f}s; all terminal at {settled_text}; workers stopped at "
        f"{o.stopped_at:.1f}s; total wall time {o.clock.now():.1f}s"
    )
    numbers = [
        ("machines", f"{len(o.planned)} over {accounts} accounts: " + _counts(scripts)),
        ("workers", workers),
        ("kills", kills),
        ("self-exits", f"{exited} workers exited by themselves (respawned)"),
    ]
    numbers.extend((f"{r.service} restart", _recovery(o, r)) for r in o.restarts)
    numbers += [
        ("history", transitions),
        ("events", read),
        ("dead letters", f"{len(o.dead_letters)}"),
        ("step executions", executions),
        ("timings", timings),
        ("worker warnings", _counts(warnings) or "none"),
        ("logs", str(o.log_dir)),
    ]
    return numbers


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counter.most_common())


def _recovery(o: Outcome, restart: Restart) -> str:
    took = (restart.up or restart.began) - restart.began
    text = f"script took {took:.1f}s (exit {restart.code})"
    up = restart.up if restart.up is not None else restart.began
    if restart.service == "mariadb":
        failed = [t for t in o.monitor_failures if restart.began - 1 <= t <= up + 30]
        if not failed:
            return text + "; the monitor never found the database down"
        last_before = next((x for x in reversed(o.samples) if x.at < failed[0]), None)
        first_after = next((x for x in o.samples if x.at > failed[-1]), None)
        if last_before is None or first_after is None:
            return text + "; the monitor has no samples around it"
        text += f"; monitor saw no database for {first_after.at - last_before.at:.1f}s"
        nxt = next(
            (
                x
                for x in o.samples
                if x.at >= first_after.at and x.max_history_id > last_before.max_history_id
            ),
            None,
        )
        if nxt is not None:
            text += (
                f"; next committed transition {nxt.at - restart.began:.1f}s after the restart "
                f"began, {nxt.at - first_after.at:.1f}s after the database answered again"
            )
        return text
    at_up = [s for s in o.samples if s.at <= up]
    applied = at_up[-1].applied if at_up else 0
    nxt_cmd = next((s for s in o.samples if s.at > up and s.applied > applied), None)
    up_wall = o.clock.wall(up)
    nxt_pub = next(
        (
            s
            for s in o.samples
            if s.at > up and s.last_published is not None and s.last_published > up_wall
        ),
        None,
    )
    text += "; next command applied " + (
        f"{nxt_cmd.at - up:.1f}s after it was back" if nxt_cmd else "n/a (none left to apply)"
    )
    text += "; next event published " + (
        f"{nxt_pub.at - up:.1f}s after it was back" if nxt_pub else "n/a"
    )
    return text


def _kill_lines(o: Outcome, orphans: list[Orphan]) -> list[str]:
    by_pid: dict[int, list[Orphan]] = defaultdict(list)
    for x in orphans:
        by_pid[x.pid].append(x)
    lines = []
    for kill in o.fleet.kills:
        hit = by_pid.get(kill.pid, [])
        steps = ", ".join(
            f"{x.machine_id.split('-')[0]}/step{x.step}/{x.direction[0]}#{x.attempt}" for x in hit
        )
        lines.append(
            f"t={kill.at:5.1f}s {kill.worker_id} pid {kill.pid} lived {kill.lived:4.1f}s: "
            + (steps or "no step in flight")
        )
    return lines
