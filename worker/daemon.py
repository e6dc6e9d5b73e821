"""The worker daemon: consume commands, run machines, relay events, report health, stop cleanly.

One process runs these threads around one Store and one Engine:

- consumer (`worker.consumer`): records each command in the database, then commits its
  offset; refused commands go to the dead-letter topic.
- executors (`concurrency` of them): run the machines the consumer hands over, and whatever
  is due in the tables (retries, timers, lock waiters, pending commands).
- lease keeper: renews the leases of the machines being run.
- relay: publishes the outbox to the machines' topics.
- sampler: gauges, and the database round trip behind /healthz.

SIGTERM or SIGINT stops consuming, lets running machines reach their next stop (bounded by
the lease time), publishes what is left, hands back what is still leased and exits 0.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

import click
import structlog
from sqlalchemy import literal, select

from worker import __version__
from worker.config import Settings, redact_config
from worker.consumer import CommandConsumer, Tally, Work, backoff
from worker.definition import Registry
from worker.engine import Engine, InFlight
from worker.errors import StoreUnavailableError, WorkerError
from worker.health import Health, HealthServer, serve
from worker.hooks import HookChain, Hooks
from worker.kafka_io import KafkaEventSink, make_admin, make_consumer, make_producer
from worker.logs import LoggingHooks, scrub
from worker.metrics import Metrics
from worker.records import HistoryEntry, Machine
from worker.relay import OutboxRelay
from worker.states import State
from worker.store import Store, make_engine

log = structlog.get_logger("worker.daemon")

SAMPLE_SECONDS = 5.0
PRUNE_SECONDS = 60.0
CHECK_TIMEOUT = 10.0
CONSUMER_CLOSE_SECONDS = 30.0
FINAL_RELAY_BATCHES = 20
FAST_PATH_SIZE = 10_000
RELAY_BUSY_WAIT_SECONDS = 0.02


# -- the process ---------------------------------------------------------------------------


class OutboxWakeup(Hooks):
    """Set when this process commits an outbox event, so the relay publishes it at once.

    Without it an idle relay sleeps up to half a poll interval before it looks again, and
    that wait was most of the latency from command to event at moderate load.
    """

    def __init__(self) -> None:
        self.ready = threading.Event()

    def command(self, machine_type: str, command: str, outcome: str) -> None:
        self.ready.set()

    def transition(self, machine: Machine, entry: HistoryEntry) -> None:
        self.ready.set()


class Daemon:
    """One worker process: its threads, the clients they share, and the way it stops."""

    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.settings = settings
        self.metrics = Metrics(__version__)
        self.outbox_wakeup = OutboxWakeup()
        self.hooks = HookChain([LoggingHooks(), self.metrics, self.outbox_wakeup])
        self.store = Store(
            make_engine(settings.sqlalchemy_url, pool_size=settings.concurrency + 6),
            registry,
            default_topic=settings.event_topic,
        )
        self.in_flight = InFlight()
        self.engine = Engine(
            self.store,
            worker_id=settings.worker_id,
            lease_seconds=settings.lease_seconds,
            hooks=self.hooks,
            in_flight=self.in_flight,
        )
        self.health = Health()
        self.tally = Tally()
        self.stopping = threading.Event()
        """Set to stop taking work: the consumer, the executors and the sampler end."""
        self.drained = threading.Event()
        """Set once the executors are done: the lease keeper and the relay end."""
        self.stop_reason: str | None = None
        self.failure: str | None = None
        self.fast_path: queue.Queue[Work] = queue.Queue(maxsize=FAST_PATH_SIZE)
        self.relay_sink = KafkaEventSink(make_producer(settings, on_fatal=self.fail))
        self.relay = OutboxRelay(self.store, self.relay_sink)
        self.consumer = CommandConsumer(
            settings,
            self.store,
            make_consumer(settings, on_fatal=self.fail),
            KafkaEventSink(make_producer(settings, on_fatal=self.fail)),
            hooks=self.hooks,
            metrics=self.metrics,
            health=self.health,
            tally=self.tally,
            fast_path=self.fast_path,
            stopping=self.stopping,
        )
        self.server: HealthServer | None = None
        self.threads: dict[str, threading.Thread] = {}

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        tables = self.store.ensure_schema()
        self.server = self._serve()
        self._spawn("consumer", self.consumer.run)
        for index in range(self.settings.concurrency):
            self._spawn(f"executor-{index}", self._execute)
        self._spawn("lease-keeper", self._keep_leases)
        self._spawn("relay", self._relay)
        self._spawn("sampler", self._sample)
        s = self.settings
        log.info(
            "worker.started",
            worker_id=s.worker_id,
            version=__version__,
            machine_types=sorted(self.store.registry),
            tables=len(tables),
            database=s.safe_database_url,
            kafka=redact_config(s.kafka_common()),
            command_topic=s.command_topic,
            event_topic=s.event_topic,
            dlq_topic=s.dlq_topic,
            group_id=s.group_id,
            concurrency=s.concurrency,
            metrics_port=self.server.port if self.server else None,
        )

    def request_stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        self.stopping.set()

    def fail(self, reason: str) -> None:
        """Stop with exit code 1: something this process cannot recover from happened."""
        if self.failure is None:
            self.failure = reason
        self.request_stop("failure")

    def wait(self) -> None:
        while not self.stopping.wait(1.0):
            pass

    def shutdown(self) -> int:
        """Stop consuming, let machines reach a stop, publish what is left, hand back the rest."""
        log.info(
            "worker.stopping",
            reason=self.stop_reason,
            failure=self.failure,
            in_flight=len(self.in_flight),
        )
        self.stopping.set()
        self._join("consumer", CONSUMER_CLOSE_SECONDS)
        deadline = time.monotonic() + self.settings.lease_seconds
        for name in self._executors():
            self._join(name, max(0.0, deadline - time.monotonic()))
        unfinished = sum(self.threads[name].is_alive() for name in self._executors())
        self.drained.set()
        self.outbox_wakeup.ready.set()  # the relay ends now, not after its idle wait
        for name in ("lease-keeper", "relay", "sampler"):
            self._join(name, self.relay.flush_timeout + 5)
        published = self._final_relay()
        handed_back = self._hand_back()
        if self.server is not None:
            self.server.stop()
        log.info(
            "worker.stopped",
            **self.tally.snapshot(),
            final_events_published=published,
            leases_handed_back=handed_back,
            executors_unfinished=unfinished,
            failure=self.failure,
        )
        return 0 if self.failure is None else 1

    def _serve(self) -> HealthServer | None:
        try:
            return serve(
                self.settings.metrics_port,
                self.metrics.registry,
                self.health,
                worker_id=self.settings.worker_id,
            )
        except OSError as exc:
            raise WorkerError(
                f"cannot serve /metrics and /healthz on port {self.settings.metrics_port}: "
                f"{exc.strerror}; choose another --metrics-port (0 turns the server off)"
            ) from exc

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(
            target=self._guarded, args=(name, target), name=f"smw-{name}", daemon=True
        )
        self.threads[name] = thread
        thread.start()

    def _guarded(self, name: str, target: Callable[[], None]) -> None:
        try:
            target()
        except Exception as exc:  # a dead thread must stop the process, loudly
            log.exception("worker.thread_failed", thread=name)
            self.fail(f"{name}: {type(exc).__name__}: {scrub(str(exc))}")

    def _join(self, name: str, timeout: float) -> None:
        thread = self.threads.get(name)
        if thread is not None:
            thread.join(timeout)

    def _executors(self) -> list[str]:
        return [name for name in self.threads if name.startswith("executor-")]

    def _final_relay(self) -> int:
        published = 0
        try:
            for _ in range(FINAL_RELAY_BATCHES):
                batch = self.relay.publish_batch()
                published += batch
                if batch == 0:
                    break
            self.relay_sink.close()
        except WorkerError as exc:
            log.warning("relay.final_batch_failed", error=scrub(str(exc)))
        return published

    def _hand_back(self) -> int:
        handed = 0
        for machine in self.in_flight.snapshot():
            try:
                self.store.release_lease(machine)
            except WorkerError as exc:
                log.warning(
                    "lease.hand_back_failed",
                    machine_type=machine.machine_type,
                    machine_id=machine.id,
                    error=scrub(str(exc)),
                )
                continue
            handed += 1
        return handed

    # -- executors ------------------------------------------------------------------------

    def _execute(self) -> None:
        """Run handed-over machines; between them, and when idle, run whatever is due."""
        busy, failures, next_scan = False, 0, 0.0
        with self.store.holding_connection():
            while not self.stopping.is_set():
                work = self._take(0.0 if busy else self.settings.poll_interval)
                scan = should_scan(
                    handed_over=work is not None,
                    was_busy=busy,
                    now=time.monotonic(),
                    next_scan=next_scan,
                )
                if scan:
                    next_scan = time.monotonic() + self.settings.poll_interval
                try:
                    ran = self._run(work, scan=scan)
                except Exception as exc:  # noqa: BLE001  # one machine's failure never ends an executor
                    failures += 1
                    _executor_failed(work, exc)
                    self.stopping.wait(backoff(failures))
                    busy = False
                    continue
                failures = 0
                busy = ran > 0 or work is not None
                self.tally.add("machines_run", ran)

    def _take(self, timeout: float) -> Work | None:
        try:
            if timeout <= 0:
                return self.fast_path.get_nowait()
            return self.fast_path.get(timeout=timeout)
        except queue.Empty:
            return None

    def _run(self, work: Work | None, *, scan: bool) -> int:
        ran = 0
        if work is not None:
            ran += self.engine.run_one(*work)
        if scan and not self.stopping.is_set():
            ran += self.engine.run_due(limit=1)
        return ran

    # -- background loops -----------------------------------------------------------------

    def _keep_leases(self) -> None:
        while not self.drained.wait(self.settings.lease_seconds / 3):
            for machine in self.in_flight.snapshot():
                try:
                    kept = self.store.renew_lease(machine, self.settings.lease_seconds)
                except StoreUnavailableError as exc:
                    log.warning("lease.renew_failed", error=scrub(str(exc)))
                    break
                if not kept:
                    log.debug(
                        "lease.moved_on", machine_type=machine.machine_type, machine_id=machine.id
                    )

    def _relay(self) -> None:
        failures = 0
        next_prune = time.monotonic() + PRUNE_SECONDS
        ready = self.outbox_wakeup.ready
        while not self.drained.is_set():
            ready.clear()  # before reading: an event committed from here on wakes the wait
            try:
                published = self.relay.publish_batch()
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + PRUNE_SECONDS
                    self.relay.prune_published()
            except Exception as exc:  # noqa: BLE001  # the relay retries; events wait in the outbox
                failures += 1
                log.warning("relay.failed", error=scrub(str(exc)), failures=failures)
                self.drained.wait(backoff(failures))
                continue
            failures = 0
            self.tally.add("events_published", published)
            if self.relay.busy_elsewhere:
                # Another worker's relay holds the lock and publishes every worker's events;
                # waking on each local commit would only send empty transactions.
                self.drained.wait(RELAY_BUSY_WAIT_SECONDS)
            elif published == 0:
                ready.wait(self.settings.poll_interval / 2)

    def _sample(self) -> None:
        while not self.stopping.wait(SAMPLE_SECONDS):
            self.sample_once()

    def sample_once(self) -> None:
        """Check the database for /healthz, then set the backlog gauges."""
        try:
            self.store.run(lambda conn: conn.execute(select(literal(1))).scalar_one())
        except StoreUnavailableError as exc:
            self.health.database(scrub(str(exc)))
            return
        self.health.database(None)
        try:
            for name in self.store.registry:
                counts = self.store.count_by_state(name)
                self.metrics.waiting.labels(name).set(counts.get(State.WAITING.value, 0))
                self.metrics.parked.labels(name).set(counts.get(State.PARKED.value, 0))
                self.metrics.runnable.labels(name).set(self.store.runnable_backlog(name))
            backlog = self.relay.backlog()
        except WorkerError as exc:
            log.warning("sampler.failed", error=scrub(str(exc)))
            return
        self.metrics.outbox_backlog.set(backlog.events)
        self.metrics.outbox_age.set(backlog.oldest_age_seconds)


def should_scan(*, handed_over: bool, was_busy: bool, now: float, next_scan: float) -> bool:
    """Whether an executor looks for due machines (timers, retries, waiters) now.

    It does after an idle wait found no handed-over work, and otherwise once per poll
    interval: scanning after every handed-over machine would add an empty claim transaction
    per machine while the consumer keeps the executors busy.
    """
    idle_wait_ended = not handed_over and not was_busy
    return idle_wait_ended or now >= next_scan


def _executor_failed(work: Work | None, error: Exception) -> None:
    machine_type, machine_id = work if work is not None else (None, None)
    if isinstance(error, StoreUnavailableError):
        log.warning(
            "executor.store_unavailable",
            machine_type=machine_type,
            machine_id=machine_id,
            error=scrub(str(error)),
        )
        return
    log.error("executor.failed", machine_type=machine_type, machine_id=machine_id, exc_info=error)


# -- entry points --------------------------------------------------------------------------


def run(settings: Settings, registry: Registry) -> int:
    """Run the worker until SIGTERM or SIGINT; 0 after a clean stop, 1 after a failure."""
    daemon = Daemon(settings, registry)
    previous = {
        sig: signal.signal(sig, _on_signal(daemon)) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        daemon.start()
        daemon.wait()
        return daemon.shutdown()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _on_signal(daemon: Daemon) -> Callable[[int, FrameType | None], None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        del frame
        name = signal.Signals(signum).name
        if daemon.stop_reason is not None:
            log.warning("worker.killed", signal=name, reason="second signal while stopping")
            os._exit(128 + signum)
        daemon.request_stop(name)

    return handler


def check(settings: Settings, registry: Registry) -> int:
    """Print one line per dependency (database, Kafka); 0 if both answer, else 1."""
    results = [
        ("database", settings.safe_database_url, _probe(lambda: _ping_database(settings))),
        ("kafka", settings.kafka_bootstrap, _probe(lambda: _ping_kafka(settings))),
    ]
    for name, target, (ok, text) in results:
        click.echo(f"{name} {'ok' if ok else 'FAILED'}: {scrub(target)}: {text}")
    click.echo(f"handlers ok: {len(registry)} machine types ({', '.join(sorted(registry))})")
    return 0 if all(ok for _, _, (ok, _) in results) else 1


def _probe(ping: Callable[[], str]) -> tuple[bool, str]:
    """Run `ping` with a time limit, in a thread that is abandoned if it hangs."""
    result: list[tuple[bool, str]] = []

    def attempt() -> None:
        try:
            result.append((True, ping()))
        except Exception as exc:  # noqa: BLE001  # any failure is the answer to the check
            result.append((False, scrub(f"{type(exc).__name__}: {exc}")))

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(CHECK_TIMEOUT + 2)
    return result[0] if result else (False, f"no answer within {CHECK_TIMEOUT:.0f}s")


def _ping_database(settings: Settings) -> str:
    engine = make_engine(settings.sqlalchemy_url, pool_size=1)
    try:
        store = Store(engine, Registry())
        store.run(lambda conn: conn.execute(select(literal(1))).scalar_one())
        return f"SELECT 1 answered at {store.db_now().isoformat()}"
    finally:
        engine.dispose()


def _ping_kafka(settings: Settings) -> str:
    metadata = make_admin(settings).list_topics(timeout=CHECK_TIMEOUT)
    present = settings.command_topic in metadata.topics
    return (
        f"{len(metadata.brokers)} broker(s); command topic {settings.command_topic} "
        f"{'exists' if present else 'does not exist yet'}"
    )
