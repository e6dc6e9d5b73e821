"""End to end: start commands on Kafka, `smw worker` processes, terminal events read back.

Each run gets fresh topics (a 6-partition command topic), a fresh consumer group and empty
tables. Latency is measured per machine from the command's publish time (carried in its
data as `sent_at`) to the moment its `completed` event is consumed here; both clocks are
this host's. Worker memory is read from /proc/<pid>/status while the run goes on.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from bench.cpu import CpuMeter, pid_from_file
from bench.database import BenchDatabase, Counters
from bench.machines import STEPS, bench_saga, initial_data

ROOT = Path(__file__).resolve().parent.parent
COMMAND_PARTITIONS = 6
GROUP_WAIT_SECONDS = 90.0
STOP_WAIT_SECONDS = 60.0
RSS_EVERY_SECONDS = 0.5
WARMUP_SECONDS = 60.0


def kafka_bootstrap() -> str:
    return os.environ.get("SMW_KAFKA_BOOTSTRAP", "127.0.0.1:9092")


def kafka_pid() -> int | None:
    """The local broker `make services` started, if that is the one in use."""
    host = kafka_bootstrap().split(",", maxsplit=1)[0].rsplit(":", 1)[0]
    if host not in ("127.0.0.1", "localhost"):
        return None
    return pid_from_file(ROOT / ".services" / "kafka.pid", ("java",))


def smw_executable() -> Path:
    return Path(sys.executable).with_name("smw")


@dataclass
class RunReport:
    """One end-to-end run: what was sent, what came back, and what it cost the server."""

    workers: int
    machines: int
    seconds: float
    latencies_ms: list[float]
    server: Counters
    rss_samples: dict[int, list[tuple[float, int]]] = field(default_factory=dict)
    rate: float | None = None
    cpu: dict[str, float] = field(default_factory=dict)
    """CPU seconds over the window: `workers`, `database`, `kafka`, `bench` (this process)."""
    disturbed: str | None = None
    """Why the numbers are not to be trusted (a service restarted during the run), if so."""

    @property
    def machines_per_second(self) -> float:
        return self.machines / self.seconds if self.seconds else 0.0

    @property
    def steps_per_second(self) -> float:
        return self.machines_per_second * STEPS

    @property
    def steps(self) -> int:
        return self.machines * STEPS

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.latencies_ms)
        if not ordered:
            return float("nan")
        index = min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))
        return ordered[index]

    def rss_kb_at(self, fraction: float) -> int:
        """The largest worker RSS sampled nearest to `fraction` of the way through the run."""
        largest = 0
        for samples in self.rss_samples.values():
            if not samples:
                continue
            first, last = samples[0][0], samples[-1][0]
            when = first + fraction * (last - first)
            nearest = min(samples, key=lambda s: abs(s[0] - when))
            largest = max(largest, nearest[1])
        return largest

    def steady_rss_kb(self) -> int:
        """The largest RSS any worker had in the second half of the run."""
        largest = 0
        for samples in self.rss_samples.values():
            if not samples:
                continue
            half = samples[0][0] + (samples[-1][0] - samples[0][0]) / 2
            largest = max([largest, *(kb for t, kb in samples if t >= half)])
        return largest


@dataclass(frozen=True)
class Services:
    """Which database and broker processes served a run, to notice a restart in between."""

    database_started: float
    kafka: int | None

    @classmethod
    def now(cls, db: BenchDatabase) -> Services:
        return cls(db.started_at(), kafka_pid())

    def changed(self, later: Services) -> str | None:
        reasons = []
        if abs(later.database_started - self.database_started) > 5:
            reasons.append("the database restarted")
        if self.kafka != later.kafka:
            reasons.append("the Kafka broker restarted")
        return " and ".join(reasons) or None


class EventListener:
    """Reads the event topic from the start and notes when each machine's last event arrives."""

    def __init__(self, topic: str) -> None:
        self.consumer = Consumer(
            {
                "bootstrap.servers": kafka_bootstrap(),
                "group.id": f"bench-listener-{uuid.uuid4().hex[:8]}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 10,
            }
        )
        self.topic = topic
        self.done: dict[str, tuple[float, float]] = {}
        """machine id -> (sent_at, consumed at) for each `completed` event."""
        self.other_terminal: dict[str, str] = {}
        self.events = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._assigned = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-listener", daemon=True)

    def start(self) -> None:
        self.consumer.subscribe([self.topic], on_assign=lambda c, p: self._assigned.set())
        self._thread.start()
        if not self._assigned.wait(30):
            raise RuntimeError(f"the event listener got no partitions of {self.topic} in 30 s")

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                message = self.consumer.poll(0.05)
                if message is None or message.error() is not None:
                    continue
                received = time.time()
                event = json.loads(message.value())
                with self._lock:
                    self.events += 1
                    state = event.get("to_state")
                    if state == "completed":
                        sent = float(event.get("data", {}).get("sent_at", received))
                        self.done.setdefault(event["machine_id"], (sent, received))
                    elif state in ("failed", "cancelled", "rollback_completed", "parked"):
                        self.other_terminal[event["machine_id"]] = state
        finally:
            self.consumer.close()

    def finished(self, machine_ids: list[str]) -> int:
        with self._lock:
            return sum(1 for m in machine_ids if m in self.done)

    def wait_for(self, machine_ids: list[str], timeout: float, logs: Path | None = None) -> float:
        """Block until every machine completed; returns the time the last one was consumed."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                missing = [m for m in machine_ids if m not in self.done]
                failed = [m for m in machine_ids if m in self.other_terminal]
            if failed:
                raise RuntimeError(
                    f"e2e: {len(failed)} machines ended in "
                    f"{sorted({self.other_terminal[m] for m in failed})}, not completed"
                )
            if not missing:
                with self._lock:
                    return max(self.done[m][1] for m in machine_ids)
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"e2e: {len(missing)} of {len(machine_ids)} machines had not completed "
                    f"after {timeout:.0f} s; see the worker logs in {logs}"
                )
            time.sleep(0.02)

    def latencies_ms(self, machine_ids: list[str]) -> list[float]:
        with self._lock:
            return [(self.done[m][1] - self.done[m][0]) * 1000 for m in machine_ids]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


class RssSampler:
    """Samples VmRSS of each worker process until stopped."""

    def __init__(self, pids: list[int]) -> None:
        self.samples: dict[int, list[tuple[float, int]]] = {pid: [] for pid in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(RSS_EVERY_SECONDS):
            now = time.monotonic()
            for pid, samples in self.samples.items():
                kb = rss_kb(pid)
                if kb is not None:
                    samples.append((now, kb))

    def stop(self) -> dict[int, list[tuple[float, int]]]:
        self._stop.set()
        self._thread.join(5)
        return self.samples


def rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Cluster:
    """Fresh topics and `workers` worker processes on the bench database."""

    def __init__(
        self, db: BenchDatabase, workers: int, concurrency: int, log_dir: Path, label: str
    ) -> None:
        self.db = db
        self.workers = workers
        self.concurrency = concurrency
        self.log_dir = log_dir
        run = f"{label}-{uuid.uuid4().hex[:8]}"
        self.command_topic = f"bench.{run}.commands"
        self.event_topic = f"bench.{run}.events"
        self.dlq_topic = f"bench.{run}.dlq"
        self.group_id = f"bench-{run}"
        self.admin = AdminClient({"bootstrap.servers": kafka_bootstrap()})
        self.processes: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        self.listener = EventListener(self.event_topic)
        self.producer = Producer(
            {"bootstrap.servers": kafka_bootstrap(), "linger.ms": 1, "acks": "all"}
        )

    # -- topics ---------------------------------------------------------------------------

    def create_topics(self) -> None:
        topics = [
            NewTopic(self.command_topic, num_partitions=COMMAND_PARTITIONS, replication_factor=1),
            NewTopic(self.event_topic, num_partitions=COMMAND_PARTITIONS, replication_factor=1),
            NewTopic(self.dlq_topic, num_partitions=1, replication_factor=1),
        ]
        for future in self.admin.create_topics(topics, operation_timeout=30).values():
            future.result()

    def delete_topics(self) -> None:
        names = [self.command_topic, self.event_topic, self.dlq_topic]
        for future in self.admin.delete_topics(names, operation_timeout=30).values():
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001  # cleanup is best effort
                print(f"bench: could not delete a topic: {exc}", file=sys.stderr)

    # -- workers --------------------------------------------------------------------------

    def environment(self, index: int) -> dict[str, str]:
        env = dict(os.environ)
        pythonpath = [str(ROOT), *filter(None, [env.get("PYTHONPATH")])]
        env.update(
            PYTHONPATH=os.pathsep.join(pythonpath),
            SMW_DATABASE_URL=self.db.url,
            SMW_KAFKA_BOOTSTRAP=kafka_bootstrap(),
            SMW_COMMAND_TOPIC=self.command_topic,
            SMW_EVENT_TOPIC=self.event_topic,
            SMW_DLQ_TOPIC=self.dlq_topic,
            SMW_GROUP_ID=self.group_id,
            SMW_HANDLERS="bench.machines",
            SMW_CONCURRENCY=str(self.concurrency),
            SMW_METRICS_PORT=str(_free_port()),
            SMW_WORKER_ID=f"{self.group_id}-w{index}",
            SMW_LOG_FORMAT="json",
            SMW_LOG_LEVEL="warning",
        )
        return env

    def start_workers(self) -> None:
        for index in range(self.workers):
            log_path = self.log_dir / f"{self.group_id}-w{index}.log"
            self.logs.append(log_path)
            with log_path.open("wb") as log_file:
                self.processes.append(
                    subprocess.Popen(
                        [str(smw_executable()), "worker"],
                        env=self.environment(index),
                        cwd=ROOT,
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                    )
                )
        self._wait_for_group()

    def _wait_for_group(self) -> None:
        """Wait until the consumer group is stable with every worker holding partitions."""
        deadline = time.monotonic() + GROUP_WAIT_SECONDS
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                description = self.admin.describe_consumer_groups([self.group_id])[
                    self.group_id
                ].result(timeout=10)
            except Exception:  # noqa: BLE001  # the group does not exist yet
                time.sleep(0.5)
                continue
            members = [m for m in description.members if m.assignment.topic_partitions]
            if str(description.state).endswith("STABLE") and len(members) == self.workers:
                return
            time.sleep(0.5)
        raise RuntimeError(
            f"e2e: {self.workers} workers did not join group {self.group_id} in "
            f"{GROUP_WAIT_SECONDS:.0f} s; see {self.log_dir}"
        )

    def check_alive(self) -> None:
        for process, log_path in zip(self.processes, self.logs, strict=True):
            if process.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(
                    f"e2e: worker pid {process.pid} exited with {process.returncode}:\n{tail}"
                )

    def stop_workers(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_WAIT_SECONDS
        for process in self.processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"bench: worker pid {process.pid} ignored SIGTERM; killing", file=sys.stderr)
                process.kill()
                process.wait(10)

    # -- commands -------------------------------------------------------------------------

    def publish(self, count: int, rate: float | None = None, start_index: int = 0) -> list[str]:
        """Publish `count` start commands, at `rate` per second or as fast as possible."""
        ids = []
        began = time.monotonic()
        for n in range(count):
            if rate:
                wait = began + n / rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
            index = start_index + n
            machine_id = str(uuid.uuid4())
            lookup_key = f"acct-{index:06d}"
            command = {
                "command_id": f"cmd-{machine_id}",
                "command": "start",
                "machine_type": bench_saga.name,
                "machine_id": machine_id,
                "lookup_key": lookup_key,
                "data": initial_data(index, time.time()),
            }
            self.produce(lookup_key, json.dumps(command, separators=(",", ":")).encode())
            ids.append(machine_id)
        self.producer.flush(30)
        return ids

    def produce(self, key: str, value: bytes) -> None:
        while True:
            try:
                self.producer.produce(self.command_topic, value=value, key=key.encode())
                break
            except BufferError:
                self.producer.poll(0.05)
        self.producer.poll(0)


@contextmanager
def cluster(
    db: BenchDatabase, workers: int, concurrency: int, log_dir: Path, label: str
) -> Iterator[Cluster]:
    """Empty tables, fresh topics, a listener and running workers; all undone afterwards."""
    db.reset()
    group = Cluster(db, workers, concurrency, log_dir, label)
    group.create_topics()
    try:
        group.listener.start()
        try:
            group.start_workers()
            yield group
        finally:
            group.stop_workers()
            group.listener.stop()
    finally:
        group.delete_topics()


def measure(
    group: Cluster,
    count: int,
    *,
    rate: float | None = None,
    timeout: float = 300.0,
    warmup: int = 0,
    on_progress: Callable[[str], None] | None = None,
) -> RunReport:
    """Warm up, then publish `count` machines and wait for every terminal event."""
    if warmup:
        warm_ids = group.publish(warmup, start_index=10_000_000)
        group.listener.wait_for(warm_ids, min(timeout, WARMUP_SECONDS), group.log_dir)
    sampler = RssSampler([p.pid for p in group.processes])
    sampler.start()
    meter = CpuMeter(
        {
            "workers": [p.pid for p in group.processes],
            "database": [pid for pid in [group.db.server_pid()] if pid],
            "kafka": [pid for pid in [kafka_pid()] if pid],
        }
    )
    cpu_before = meter.snapshot()
    services = Services.now(group.db)
    before = group.db.counters()
    began = time.time()
    ids = group.publish(count, rate=rate)
    if on_progress:
        on_progress(f"published {count} commands in {time.time() - began:.1f} s")
    last = group.listener.wait_for(ids, timeout, group.log_dir)
    after = group.db.counters()
    cpu = meter.used(cpu_before, meter.snapshot())
    disturbed = services.changed(Services.now(group.db))
    group.check_alive()
    return RunReport(
        workers=group.workers,
        machines=count,
        seconds=last - began,
        latencies_ms=group.listener.latencies_ms(ids),
        server=after.minus(before),
        rss_samples=sampler.stop(),
        rate=rate,
        cpu=cpu,
        disturbed=disturbed,
    )


def log_directory() -> Path:
    return Path(tempfile.mkdtemp(prefix="smw-bench-"))


def background_questions(db: BenchDatabase, seconds: float = 2.0) -> float:
    """Statements per second the server runs for other clients while the bench is idle."""
    before = db.counters()
    time.sleep(seconds)
    after = db.counters().minus(before)
    return max(0.0, (after.questions - 2) / after.taken_at)


def require_worker() -> str | None:
    """None if `smw worker` can run here, else why not."""
    executable = smw_executable()
    if not executable.exists():
        return f"{executable} not found"
    probe = subprocess.run(
        [str(executable), "worker", "--help"], capture_output=True, timeout=60, check=False
    )
    if probe.returncode != 0:
        return f"`smw worker --help` failed: {probe.stderr.decode(errors='replace')[-500:]}"
    return None
