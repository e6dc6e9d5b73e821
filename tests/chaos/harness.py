"""The chaos run: a fleet of `smw worker` processes, a publisher, a killer and two restarts.

`run(Options())` does, in order:

1. create a fresh database on the server of SMW_DATABASE_URL (schema plus CHAOS_STEP_RUN)
   and fresh command, event and dead-letter topics with a consumer group of their own;
2. plan the machines: a seeded script per machine (plain, retried, rolled back, compensation
   retried, given up), several machines per account, with the outcome each must reach;
3. start the workers, then for `duration` seconds: publish the start commands gradually,
   SIGKILL a random worker every 1-3 s and start a replacement, restart MariaDB once and the
   Kafka broker once (deploy/local/*.sh restart, data kept) while work is in flight, and
   respawn any worker that exits by itself;
4. keep the fleet full until every machine is terminal and the outbox is empty, then stop the
   workers with SIGTERM;
5. read the event and dead-letter topics from the beginning and hand everything to
   `tests.chaos.report`, which checks the invariants.

Every worker's log is kept in the run's log directory (printed in the report).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic
from sqlalchemy.engine import make_url

from tests.chaos import machines
from tests.chaos.machines import TYPE_NAME, expected_path, expected_state
from worker import tables
from worker.definition import Registry
from worker.store import Store

REPO = Path(__file__).resolve().parents[2]
SMW = Path(sys.executable).with_name("smw")
HANDLERS = "tests.chaos.machines"
DEFAULT_DATABASE_URL = "mysql+mysqldb://root@127.0.0.1:3306/smw_test"
DEFAULT_KAFKA = "127.0.0.1:9092"
TERMINAL = frozenset({"completed", "failed", "rollback_completed", "cancelled"})
COMMAND_PARTITIONS = 6
EVENT_PARTITIONS = 3
RESTART_TIMEOUT = 300.0
PROGRESS_SECONDS = 5.0
RESPAWN_PAUSE = 1.0
"""A slot whose worker exited by itself gets a new one at most this often."""


@dataclass
class Options:
    machines: int = 300
    accounts: int = 40
    workers: int = 3
    duration: float = 60.0
    """Seconds of SIGKILLs; publishing and the restarts happen inside this window."""
    kill_every: tuple[float, float] = (1.0, 3.0)
    db_restart: bool = True
    kafka_restart: bool = True
    db_outage: float = 0.0
    """If set, MariaDB stays down this many seconds (down, wait, up) instead of a restart."""
    db_restart_at: float = 0.3
    """When to restart MariaDB, as a fraction of `duration`."""
    kafka_restart_at: float = 0.5
    publish_span: float = 0.85
    """Commands are published over this fraction of `duration`."""
    lease_seconds: float = 4.0
    concurrency: int = 4
    step_sleep: float = 0.02
    settle_timeout: float = 240.0
    """After the kills stop: how long every machine may take to become terminal."""
    seed: int | None = None
    session_timeout_ms: int = 6000
    """The consumer group's session timeout: how soon a SIGKILLed member's partitions move."""
    database_url: str = field(
        default_factory=lambda: os.environ.get("SMW_DATABASE_URL", DEFAULT_DATABASE_URL)
    )
    kafka: str = field(default_factory=lambda: os.environ.get("SMW_KAFKA_BOOTSTRAP", DEFAULT_KAFKA))
    keep: bool = False
    """Keep the database, topics and logs even when every invariant holds."""
    keep_on_failure: bool = True
    progress: Callable[[str], None] | None = None


class CannotRestartError(RuntimeError):
    """A restart was asked for that this run cannot do (see `restart_blocker`)."""


# -- the plan ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Planned:
    machine_id: str
    lookup_key: str
    command_id: str
    script: str
    data: dict[str, Any]
    expected_state: str
    expected_path: tuple[tuple[str, str | None], ...]
    send_at: float

    def command(self) -> bytes:
        return json.dumps(
            {
                "command_id": self.command_id,
                "command": "start",
                "machine_type": TYPE_NAME,
                "machine_id": self.machine_id,
                "lookup_key": self.lookup_key,
                "data": self.data,
            }
        ).encode("utf-8")


def plan(options: Options, rng: random.Random, suffix: str) -> list[Planned]:
    """The machines to start, in publishing order, each with its script and expected end."""
    span = options.duration * options.publish_span
    times = sorted(rng.uniform(0, span) for _ in range(options.machines))
    planned = []
    for index, send_at in enumerate(times):
        script, data = _script(rng)
        data = {"sleep": options.step_sleep, **data}
        machine_id = f"c{index:04d}-{suffix}"
        planned.append(
            Planned(
                machine_id=machine_id,
                lookup_key=f"acct{rng.randrange(options.accounts):02d}-{suffix}",
                command_id=f"start-{machine_id}",
                script=script,
                data=data,
                expected_state=expected_state(data),
                expected_path=tuple(expected_path(data)),
                send_at=send_at,
            )
        )
    return planned


def _script(rng: random.Random) -> tuple[str, dict[str, Any]]:
    draw = rng.random()
    last = machines.STEPS - 1
    if draw < 0.50:
        return "plain", {}
    if draw < 0.70:
        return "retried", {"fail_at": rng.randint(0, last), "failures": rng.randint(1, 2)}
    if draw < 0.82:
        return "rolled_back", {"rollback_at": rng.randint(0, last)}
    if draw < 0.88:
        rollback_at = rng.randint(1, last)
        return "compensation_retried", {
            "rollback_at": rollback_at,
            "comp_fail_at": rng.randint(0, rollback_at - 1),
            "comp_failures": 1,
        }
    if draw < 0.94:
        fail_at = rng.randint(0, last - 1)
        return "retried_then_rolled_back", {
            "fail_at": fail_at,
            "failures": 1,
            "rollback_at": rng.randint(fail_at + 1, last),
        }
    return "gave_up", {"fail_at": rng.randint(0, last), "failures": 99}


# -- the world: database and topics --------------------------------------------------------


class World:
    """This run's database and topics, created fresh and removed at the end."""

    def __init__(self, options: Options, suffix: str) -> None:
        self.options = options
        self.suffix = suffix
        base = make_url(options.database_url)
        self.db_name = f"smw_chaos_{suffix}"
        self.url = base.set(database=self.db_name).render_as_string(hide_password=False)
        self.admin_db = sa.create_engine(
            base.set(database=""), isolation_level="AUTOCOMMIT", pool_pre_ping=True
        )
        self.command_topic = f"smw.chaos.{suffix}.commands"
        self.event_topic = f"smw.chaos.{suffix}.events"
        self.dlq_topic = f"smw.chaos.{suffix}.dlq"
        self.group_id = f"smw-chaos-{suffix}"
        self.admin = AdminClient({"bootstrap.servers": options.kafka, "log_level": 0})
        self.db: sa.Engine | None = None

    def create(self) -> None:
        with self.admin_db.connect() as conn:
            conn.execute(sa.text(f"CREATE DATABASE `{self.db_name}` CHARACTER SET utf8mb4"))
        self.db = sa.create_engine(
            self.url, pool_pre_ping=True, isolation_level="READ COMMITTED", pool_size=4
        )
        store = Store(self.db, Registry.from_modules([HANDLERS]))
        store.ensure_schema()
        machines.run_metadata.create_all(self.db)
        futures = self.admin.create_topics(
            [
                NewTopic(self.command_topic, COMMAND_PARTITIONS, 1),
                NewTopic(self.event_topic, EVENT_PARTITIONS, 1),
                NewTopic(self.dlq_topic, 1, 1),
            ]
        )
        for future in futures.values():
            future.result(timeout=60)

    def destroy(self) -> None:
        if self.db is not None:
            self.db.dispose()
        with contextlib.suppress(sa.exc.SQLAlchemyError), self.admin_db.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS `{self.db_name}`"))
        self.admin_db.dispose()
        topics = [self.command_topic, self.event_topic, self.dlq_topic]
        for future in self.admin.delete_topics(topics).values():
            with contextlib.suppress(KafkaException):
                future.result(timeout=60)

    @property
    def engine(self) -> sa.Engine:
        assert self.db is not None
        return self.db


# -- workers -------------------------------------------------------------------------------


@dataclass
class WorkerRun:
    """One `smw worker` process, from spawn to its end."""

    worker_id: str
    slot: int
    process: subprocess.Popen[bytes]
    log_path: Path
    started: float
    ended: float | None = None
    end: str | None = None
    """killed (by the harness), exited (by itself), or stopped (SIGTERM at the end)."""
    code: int | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.end is None and self.process.poll() is None


@dataclass(frozen=True)
class Kill:
    at: float
    worker_id: str
    pid: int
    lived: float


class Fleet:
    """The worker processes: spawn, kill, respawn the ones that exited, stop them all."""

    def __init__(self, options: Options, world: World, log_dir: Path, clock: Clock) -> None:
        self.options = options
        self.world = world
        self.log_dir = log_dir
        self.clock = clock
        self.runs: list[WorkerRun] = []
        self.kills: list[Kill] = []
        self._respawn_after: dict[int, float] = {}

    def env(self, worker_id: str) -> dict[str, str]:
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("SMW_")}
        w = self.world
        return {
            **inherited,
            "PYTHONPATH": str(REPO),
            "SMW_DATABASE_URL": w.url,
            "SMW_KAFKA_BOOTSTRAP": self.options.kafka,
            "SMW_KAFKA_CONFIG": (
                f"session.timeout.ms={self.options.session_timeout_ms},heartbeat.interval.ms=1000"
            ),
            "SMW_COMMAND_TOPIC": w.command_topic,
            "SMW_EVENT_TOPIC": w.event_topic,
            "SMW_DLQ_TOPIC": w.dlq_topic,
            "SMW_GROUP_ID": w.group_id,
            "SMW_HANDLERS": HANDLERS,
            "SMW_LEASE_SECONDS": str(self.options.lease_seconds),
            "SMW_CONCURRENCY": str(self.options.concurrency),
            "SMW_LOG_FORMAT": "json",
            "SMW_METRICS_PORT": "0",
            "SMW_WORKER_ID": worker_id,
        }

    def spawn(self, slot: int) -> WorkerRun:
        worker_id = f"chaos-{len(self.runs) + 1:03d}"
        log_path = self.log_dir / f"{worker_id}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [str(SMW), "worker"],
                env=self.env(worker_id),
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        run = WorkerRun(worker_id, slot, process, log_path, self.clock.now())
        self.runs.append(run)
        return run

    def start(self) -> None:
        for slot in range(self.options.workers):
            self.spawn(slot)

    def alive(self) -> list[WorkerRun]:
        return [r for r in self.runs if r.alive]

    def kill_random(self, rng: random.Random) -> Kill | None:
        candidates = self.alive()
        if not candidates:
            return None
        victim = rng.choice(candidates)
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait(30)
        now = self.clock.now()
        victim.ended, victim.end, victim.code = now, "killed", victim.process.returncode
        kill = Kill(now, victim.worker_id, victim.pid, now - victim.started)
        self.kills.append(kill)
        self.spawn(victim.slot)
        return kill

    def reap(self) -> list[WorkerRun]:
        """Note workers that exited by themselves; give their slots new ones (paced)."""
        exited = []
        now = self.clock.now()
        for run in self.runs:
            if run.end is None and run.process.poll() is not None:
                run.ended, run.end, run.code = now, "exited", run.process.returncode
                exited.append(run)
                self._respawn_after[run.slot] = now + RESPAWN_PAUSE
        live_slots = {r.slot for r in self.runs if r.end is None}
        for slot in range(self.options.workers):
            if slot not in live_slots and now >= self._respawn_after.get(slot, 0.0):
                self.spawn(slot)
        return exited

    def stop_all(self, timeout: float) -> None:
        running = self.alive()
        for run in running:
            run.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for run in running:
            try:
                run.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                run.process.kill()
                run.process.wait(30)
            run.ended, run.end, run.code = self.clock.now(), "stopped", run.process.returncode
        self.reap_final()

    def reap_final(self) -> None:
        for run in self.runs:
            if run.end is None and run.process.poll() is not None:
                run.ended, run.end, run.code = self.clock.now(), "exited", run.process.returncode

    def kill_all(self) -> None:
        """Cleanup after an error: no worker this run started outlives it."""
        for run in self.runs:
            if run.process.poll() is None:
                run.process.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    run.process.wait(30)


# -- time ----------------------------------------------------------------------------------


class Clock:
    """Seconds since the run began, and the wall-clock (UTC) time of any such instant."""

    def __init__(self) -> None:
        self.began = time.monotonic()
        self.began_wall = datetime.now(UTC)

    def now(self) -> float:
        return time.monotonic() - self.began

    def wall(self, at: float) -> datetime:
        return datetime.fromtimestamp(self.began_wall.timestamp() + at, UTC)

    def at(self, wall: datetime) -> float:
        return wall.timestamp() - self.began_wall.timestamp()


# -- background activities -----------------------------------------------------------------


class Publisher(threading.Thread):
    """Publishes each planned start command at its time, keyed by its lookup key."""

    def __init__(self, options: Options, world: World, planned: list[Planned], clock: Clock):
        super().__init__(name="chaos-publisher", daemon=True)
        self.options = options
        self.world = world
        self.planned = planned
        self.clock = clock
        self.stopping = threading.Event()
        self.produced = 0
        self.delivered = 0
        self.failures: list[str] = []
        self.finished_at: float | None = None
        self.error: str | None = None

    def run(self) -> None:
        try:
            self._publish()
        except Exception as exc:  # noqa: BLE001  # reported, never silently lost
            self.error = f"{type(exc).__name__}: {exc}"

    def _publish(self) -> None:
        producer = Producer(
            {
                "bootstrap.servers": self.options.kafka,
                "enable.idempotence": True,
                "linger.ms": 5,
                "message.timeout.ms": 600_000,
                "log_level": 0,
            }
        )

        def delivered(error: KafkaError | None, message: Message) -> None:
            del message
            if error is None:
                self.delivered += 1
            else:
                self.failures.append(f"{error.name()}: {error.str()}")

        for planned in self.planned:
            while not self.stopping.is_set() and self.clock.now() < planned.send_at:
                producer.poll(min(0.05, max(0.0, planned.send_at - self.clock.now())))
            if self.stopping.is_set():
                break
            producer.produce(
                self.world.command_topic,
                key=planned.lookup_key.encode("utf-8"),
                value=planned.command(),
                on_delivery=delivered,
            )
            self.produced += 1
            producer.poll(0)
        left = producer.flush(300)
        if left:
            self.failures.append(f"{left} commands not acknowledged after 300 s")
        self.finished_at = self.clock.now()


@dataclass
class Restart:
    service: str
    began: float
    up: float | None = None
    code: int | None = None
    output: str = ""


def restart_service(service: str, clock: Clock, down_for: float = 0.0) -> Restart:
    """`deploy/local/<service>.sh restart` (data kept); records when it began and was up.

    With `down_for`, the service is stopped, left down that long, then started again.
    """
    record = Restart(service, clock.now())
    script = REPO / "deploy" / "local" / f"{service}.sh"
    env = {**os.environ, "PYTHON": sys.executable}
    steps = [["restart"]] if down_for <= 0 else [["down"], ["up"]]
    output = ""
    for index, args in enumerate(steps):
        if index:
            time.sleep(down_for)
        try:
            done = subprocess.run(
                [str(script), *args],
                capture_output=True,
                text=True,
                timeout=RESTART_TIMEOUT,
                env=env,
                check=False,
            )
            record.code = done.returncode
            output += done.stdout + done.stderr
        except subprocess.TimeoutExpired as exc:
            record.code, output = -1, output + f"timed out after {exc.timeout}s"
        if record.code != 0:
            break
    record.output = output[-2000:]
    record.up = clock.now()
    return record


def restart_blocker(service: str, options: Options) -> str | None:
    """Why this run cannot restart `service` itself (None if it can).

    Only a service that deploy/local/<service>.sh started (its pid file names a live
    process) and that this run talks to on this host can be restarted.
    """
    if os.environ.get("SMW_SKIP_SERVICES") == "1":
        return "SMW_SKIP_SERVICES=1: the services are not this repository's to restart"
    state = Path(os.environ.get("SMW_SERVICES_DIR", REPO / ".services"))
    pidfile = state / f"{service}.pid"
    try:
        pid = int(pidfile.read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return f"{service} was not started by deploy/local/{service}.sh (no {pidfile})"
    if not Path(f"/proc/{pid}").exists():
        return f"{service} pid {pid} from {pidfile} is not running"
    local = {"127.0.0.1", "localhost"}
    if service == "mariadb" and make_url(options.database_url).host not in local:
        return "SMW_DATABASE_URL points at another host than the local MariaDB"
    if service == "kafka" and options.kafka.split(",")[0].rsplit(":", 1)[0] not in local:
        return "SMW_KAFKA_BOOTSTRAP points at another host than the local broker"
    return None


def ensure_services_up() -> list[str]:
    """Bring MariaDB and Kafka up if a restart left either down; returns what it did."""
    notes = []
    for service in ("mariadb", "kafka"):
        script = REPO / "deploy" / "local" / f"{service}.sh"
        env = {**os.environ, "PYTHON": sys.executable}
        status = subprocess.run(
            [str(script), "status"], capture_output=True, text=True, env=env, check=False
        )
        if status.returncode != 0:
            up = subprocess.run(
                [str(script), "up"],
                capture_output=True,
                text=True,
                env=env,
                timeout=RESTART_TIMEOUT,
                check=False,
            )
            notes.append(f"{service} was down after the run; `up` exited {up.returncode}")
    return notes


class Restarter(threading.Thread):
    def __init__(self, service: str, clock: Clock, down_for: float = 0.0) -> None:
        super().__init__(name=f"chaos-restart-{service}", daemon=True)
        self.service = service
        self.clock = clock
        self.down_for = down_for
        self.result: Restart | None = None

    def run(self) -> None:
        self.result = restart_service(self.service, self.clock, self.down_for)


@dataclass(frozen=True)
class Sample:
    at: float
    max_history_id: int
    applied: int
    terminal: int
    unpublished: int
    last_published: datetime | None


class Monitor(threading.Thread):
    """Samples the database every 0.2 s: progress, and when work resumed after a restart."""

    def __init__(self, world: World, clock: Clock) -> None:
        super().__init__(name="chaos-monitor", daemon=True)
        self.clock = clock
        self.engine = sa.create_engine(
            world.url,
            pool_pre_ping=True,
            pool_size=1,
            connect_args={"connect_timeout": 2},
        )
        table = tables.machine_table(TYPE_NAME)
        h, p, o = tables.history, tables.processed_command, tables.outbox
        self.query = sa.select(
            sa.select(sa.func.coalesce(sa.func.max(h.c.ID), 0)).scalar_subquery(),
            sa.select(sa.func.count()).select_from(p).scalar_subquery(),
            sa.select(sa.func.count())
            .select_from(table)
            .where(table.c.CurrentState.in_(sorted(TERMINAL)))
            .scalar_subquery(),
            sa.select(sa.func.count())
            .select_from(o)
            .where(o.c.PublishedTimestamp.is_(None))
            .scalar_subquery(),
            sa.select(sa.func.max(o.c.PublishedTimestamp)).scalar_subquery(),
        )
        self.samples: list[Sample] = []
        self.failures: list[float] = []
        """When a sample failed: the database did not answer."""
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.2):
            try:
                with self.engine.connect() as conn:
                    row = conn.execute(self.query).one()
            except sa.exc.SQLAlchemyError:
                self.failures.append(self.clock.now())
            else:
                published = row[4]
                self.samples.append(
                    Sample(
                        self.clock.now(),
                        int(row[0]),
                        int(row[1]),
                        int(row[2]),
                        int(row[3]),
                        None if published is None else published.replace(tzinfo=UTC),
                    )
                )
        self.engine.dispose()

    def latest(self) -> Sample | None:
        return self.samples[-1] if self.samples else None


# -- reading topics ------------------------------------------------------------------------


def read_topic(bootstrap: str, topic: str, timeout: float = 120.0) -> list[Message]:
    """Every message on `topic`, from the beginning to the end it had when reading began."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"smw-chaos-reader-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,
            "log_level": 0,
        }
    )
    try:
        metadata = consumer.list_topics(topic, timeout=30)
        partitions = sorted(metadata.topics[topic].partitions)
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1]
            for p in partitions
        }
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        remaining = {p for p, end in ends.items() if end > 0}
        messages: list[Message] = []
        deadline = time.monotonic() + timeout
        while remaining:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"read {len(messages)} messages of {topic}; partitions {sorted(remaining)} "
                    f"did not reach their end in {timeout:.0f}s"
                )
            message = consumer.poll(0.5)
            if message is None:
                continue
            error = message.error()
            partition = message.partition() or 0
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    if (message.offset() or 0) >= ends[partition]:
                        remaining.discard(partition)
                    continue
                raise KafkaException(error)
            messages.append(message)
            if (message.offset() or 0) >= ends[partition] - 1:
                remaining.discard(partition)
        return messages
    finally:
        consumer.close()


# -- the run -------------------------------------------------------------------------------


@dataclass
class Outcome:
    """Everything the report needs, gathered by `run`."""

    options: Options
    seed: int
    suffix: str
    planned: list[Planned]
    world: World
    clock: Clock
    fleet: Fleet
    publisher: Publisher
    restarts: list[Restart]
    samples: list[Sample]
    monitor_failures: list[float]
    chaos_ended: float
    settled_at: float | None
    stopped_at: float
    events: list[Message]
    dead_letters: list[Message]
    log_dir: Path
    notes: list[str]


def run(options: Options) -> Any:
    """Run the chaos scenario and return its `tests.chaos.report.Report`."""
    from tests.chaos.report import analyze  # noqa: PLC0415  # report imports this module

    blocked = [
        f"cannot restart {service}: {reason}"
        for service, wanted in (("mariadb", options.db_restart), ("kafka", options.kafka_restart))
        if wanted and (reason := restart_blocker(service, options)) is not None
    ]
    if blocked:
        raise CannotRestartError("; ".join(blocked))
    seed = options.seed if options.seed is not None else random.SystemRandom().randrange(10**6)
    rng = random.Random(seed)
    suffix = uuid.uuid4().hex[:8]
    say = options.progress or (lambda line: print(line, file=sys.stderr, flush=True))
    log_dir = Path(tempfile.mkdtemp(prefix=f"smw-chaos-{suffix}-"))
    world = World(options, suffix)
    world.create()
    say(
        f"chaos {suffix}: seed {seed}; database {world.db_name}; topics smw.chaos.{suffix}.*; "
        f"logs {log_dir}"
    )
    clock = Clock()
    planned = plan(options, rng, suffix)
    fleet = Fleet(options, world, log_dir, clock)
    publisher = Publisher(options, world, planned, clock)
    monitor = Monitor(world, clock)
    restarters: list[Restarter] = []
    notes: list[str] = []
    report = None
    try:
        fleet.start()
        publisher.start()
        monitor.start()
        _chaos(
            options=options,
            rng=rng,
            clock=clock,
            fleet=fleet,
            publisher=publisher,
            monitor=monitor,
            restarters=restarters,
            say=say,
        )
        chaos_ended = clock.now()
        for restarter in restarters:
            restarter.join(RESTART_TIMEOUT + 30)
        settled_at = _settle(
            options=options,
            clock=clock,
            fleet=fleet,
            publisher=publisher,
            monitor=monitor,
            planned=planned,
            say=say,
        )
        fleet.stop_all(options.lease_seconds + 60)
        stopped_at = clock.now()
        monitor.stopping.set()
        monitor.join(10)
        say(f"chaos {suffix}: reading the event and dead-letter topics")
        events = read_topic(options.kafka, world.event_topic)
        dead_letters = read_topic(options.kafka, world.dlq_topic)
        report = analyze(
            Outcome(
                options=options,
                seed=seed,
                suffix=suffix,
                planned=planned,
                world=world,
                clock=clock,
                fleet=fleet,
                publisher=publisher,
                restarts=[r.result for r in restarters if r.result is not None],
                samples=list(monitor.samples),
                monitor_failures=list(monitor.failures),
                chaos_ended=chaos_ended,
                settled_at=settled_at,
                stopped_at=stopped_at,
                events=events,
                dead_letters=dead_letters,
                log_dir=log_dir,
                notes=notes,
            )
        )
        return report
    finally:
        publisher.stopping.set()
        monitor.stopping.set()
        fleet.kill_all()
        notes.extend(ensure_services_up())
        keep = options.keep or (options.keep_on_failure and (report is None or not report.ok))
        if keep:
            say(f"chaos {suffix}: kept database {world.db_name}, its topics and logs {log_dir}")
        else:
            world.destroy()
            shutil.rmtree(log_dir, ignore_errors=True)


def _chaos(
    *,
    options: Options,
    rng: random.Random,
    clock: Clock,
    fleet: Fleet,
    publisher: Publisher,
    monitor: Monitor,
    restarters: list[Restarter],
    say: Callable[[str], None],
) -> None:
    """Kill, replace and restart for `duration` seconds."""
    due: list[tuple[float, str]] = []
    if options.db_restart:
        due.append((options.duration * options.db_restart_at, "mariadb"))
    if options.kafka_restart:
        due.append((options.duration * options.kafka_restart_at, "kafka"))
    next_kill = clock.now() + rng.uniform(*options.kill_every)
    next_progress = 0.0
    while clock.now() < options.duration:
        now = clock.now()
        fleet.reap()
        if now >= next_kill:
            fleet.kill_random(rng)
            next_kill = now + rng.uniform(*options.kill_every)
        busy = any(r.is_alive() for r in restarters)
        if due and now >= due[0][0] and not busy:
            _, service = due.pop(0)
            say(f"  t={now:5.1f}s restarting {service}")
            restarter = Restarter(service, clock, _down_for(options, service))
            restarters.append(restarter)
            restarter.start()
        if now >= next_progress:
            next_progress = now + PROGRESS_SECONDS
            say(_progress(clock, fleet, publisher, monitor))
        time.sleep(0.05)
    while due:  # a restart that could not start before the window closed still happens
        for restarter in restarters:
            restarter.join(RESTART_TIMEOUT + 30)
        _, service = due.pop(0)
        say(f"  t={clock.now():5.1f}s restarting {service} (late)")
        restarter = Restarter(service, clock, _down_for(options, service))
        restarters.append(restarter)
        restarter.start()


def _down_for(options: Options, service: str) -> float:
    return options.db_outage if service == "mariadb" else 0.0


def _settle(
    *,
    options: Options,
    clock: Clock,
    fleet: Fleet,
    publisher: Publisher,
    monitor: Monitor,
    planned: list[Planned],
    say: Callable[[str], None],
) -> float | None:
    """Keep the fleet full until every machine is terminal and every event published."""
    deadline = clock.now() + options.settle_timeout
    next_progress = 0.0
    while clock.now() < deadline:
        fleet.reap()
        sample = monitor.latest()
        if (
            publisher.finished_at is not None
            and sample is not None
            and sample.at > publisher.finished_at
            and sample.terminal == len(planned)
            and sample.unpublished == 0
        ):
            return clock.now()
        if clock.now() >= next_progress:
            next_progress = clock.now() + PROGRESS_SECONDS
            say(_progress(clock, fleet, publisher, monitor) + " (settling)")
        time.sleep(0.2)
    say(f"  t={clock.now():5.1f}s settle timeout after {options.settle_timeout:.0f}s")
    return None


def _progress(clock: Clock, fleet: Fleet, publisher: Publisher, monitor: Monitor) -> str:
    sample = monitor.latest()
    db = (
        f"applied {sample.applied}, terminal {sample.terminal}, history {sample.max_history_id}, "
        f"unpublished {sample.unpublished}"
        if sample
        else "database not sampled yet"
    )
    return (
        f"  t={clock.now():5.1f}s sent {publisher.produced}/{len(publisher.planned)}; {db}; "
        f"workers {len(fleet.alive())}; kills {len(fleet.kills)}"
    )
