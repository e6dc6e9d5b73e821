"""The real `smw` binary as subprocesses, against a real MariaDB and a real Kafka broker.

Each test gets a fresh database and its own command, event and dead-letter topics and
consumer group, runs `smw schema apply`, starts `smw worker`, then drives it with
`smw send` over Kafka and inspects the result with `smw machines`, `smw locks` and
`smw prune`, checking exit codes and exact output.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

pytestmark = pytest.mark.acceptance

SMW = str(Path(sys.executable).parent / "smw")
ORDER_HISTORY = 7  # created, started, five step_succeeded
WAIT_SECONDS = 60.0
PASSWORD = "s3cretpw"  # noqa: S105  # a fake password the tests prove never leaks


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_smw(env: dict[str, str], *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [SMW, *args], env=env, capture_output=True, text=True, timeout=90, check=False
    )
    assert done.returncode == code, f"smw {' '.join(args)}: {done.stdout}{done.stderr}"
    return done


def create_topics(bootstrap: str, names: list[str]) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(n, num_partitions=3) for n in names])
    for future in futures.values():
        future.result(timeout=30)


def base_env() -> dict[str, str]:
    """The caller's environment without any SMW_* setting (the tests set their own)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SMW_")}


@pytest.fixture
def env(fresh_mysql_url: str, kafka: str) -> Iterator[dict[str, str]]:
    """Settings for one test: its own database, topics and group, removed afterwards."""
    suffix = uuid.uuid4().hex[:10]
    topics = {
        "SMW_COMMAND_TOPIC": f"smw.accept.{suffix}.commands",
        "SMW_EVENT_TOPIC": f"smw.accept.{suffix}.events",
        "SMW_DLQ_TOPIC": f"smw.accept.{suffix}.dlq",
    }
    create_topics(kafka, list(topics.values()))
    group = f"smw-accept-{suffix}"
    yield {
        **base_env(),
        **topics,
        "SMW_DATABASE_URL": fresh_mysql_url,
        "SMW_KAFKA_BOOTSTRAP": kafka,
        "SMW_GROUP_ID": group,
        "SMW_METRICS_PORT": str(free_port()),
        "SMW_LOG_FORMAT": "json",
        "SMW_HANDLERS": "handlers",
        "SMW_CONCURRENCY": "2",
    }
    admin = AdminClient({"bootstrap.servers": kafka})
    pending = [
        *admin.delete_topics(list(topics.values())).values(),
        *admin.delete_consumer_groups([group]).values(),
    ]
    for future in pending:
        with contextlib.suppress(KafkaException):  # best effort: a group may never have joined
            future.result(timeout=30)


@pytest.fixture
def worker(env: dict[str, str], tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`smw schema apply`, then a running `smw worker` that answers /healthz."""
    applied = run_smw(env, "schema", "apply")
    assert applied.stdout.splitlines()[0].endswith(": 10 tables")
    log = (tmp_path / "worker.log").open("wb")
    process = subprocess.Popen([SMW, "worker"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_health(int(env["SMW_METRICS_PORT"]), process, tmp_path / "worker.log")
        yield process
    finally:
        process.terminate()
        try:
            code = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
        finally:
            log.close()
    assert code == 0, (tmp_path / "worker.log").read_text()[-4000:]


def wait_for_health(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        assert process.poll() is None, f"smw worker exited: {log.read_text()[-4000:]}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    pytest.fail(f"smw worker did not answer /healthz within {WAIT_SECONDS}s")


def poll(what: str, probe: Callable[[], Any], until: Callable[[Any], bool]) -> Any:
    deadline = time.monotonic() + WAIT_SECONDS
    value = probe()
    while not until(value):
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: still {value!r} after {WAIT_SECONDS}s")
        time.sleep(0.3)
        value = probe()
    return value


def states(env: dict[str, str]) -> dict[str, str]:
    listed = json.loads(run_smw(env, "machines", "list", "--format", "json").stdout)
    return {m["id"]: m["state"] for m in listed}


def wait_for_state(env: dict[str, str], machine_id: str, state: str) -> None:
    poll(
        f"state of {machine_id}",
        lambda: states(env).get(machine_id),
        lambda found: found == state,
    )


def send_start(env: dict[str, str], machine_id: str, key: str, data: dict[str, Any]) -> None:
    sent = run_smw(
        env,
        "send",
        "start",
        "--type",
        "order_saga",
        "--id",
        machine_id,
        "--key",
        key,
        "--command-id",
        f"cmd-{machine_id}",
        "--data",
        json.dumps(data),
    )
    assert sent.stdout.splitlines() == [
        f"machine_id: {machine_id}",
        f"command_id: cmd-{machine_id}",
        f"topic: {env['SMW_COMMAND_TOPIC']}",
        f"key: {key}",
    ]


@pytest.mark.usefixtures("worker")
def test_a_started_order_completes_and_show_prints_its_history(env: dict[str, str]) -> None:
    send_start(env, "order-1", "acct-1", {"amount": 12})
    wait_for_state(env, "order-1", "completed")
    table = run_smw(env, "machines", "list", "--type", "order_saga").stdout.splitlines()
    assert table[1].split()[:6] == ["order_saga", "order-1", "acct-1", "completed", "4", "0"]
    shown = run_smw(env, "machines", "show", "order-1", "--type", "order_saga").stdout
    lines = shown.splitlines()
    assert lines[0] == "machine order-1"
    assert "  state        completed" in lines
    assert "  local lock   released" in lines
    assert f"history ({ORDER_HISTORY} transitions)" in lines
    first = lines[lines.index(f"history ({ORDER_HISTORY} transitions)") + 2]
    assert first.split()[2:6] == ["created", "pending", "→", "pending"]
    assert first.endswith("command cmd-order-1")
    assert lines[-1].split()[2:6] == ["step_succeeded", "open", "→", "completed"]
    assert lines[-1].endswith("  4 notify_customer")
    as_json = json.loads(
        run_smw(
            env, "machines", "show", "order-1", "--type", "order_saga", "--format", "json"
        ).stdout
    )
    assert as_json["machine"]["data"]["charged"] == 12
    assert [h["sequence"] for h in as_json["history"]] == list(range(1, ORDER_HISTORY + 1))


@pytest.mark.usefixtures("worker")
def test_a_parked_order_is_overridden_by_an_operator(env: dict[str, str]) -> None:
    send_start(env, "order-p", "acct-2", {"fraud_review": True})
    wait_for_state(env, "order-p", "parked")
    override = run_smw(
        env,
        "send",
        "override",
        "--type",
        "order_saga",
        "--id",
        "order-p",
        "--command-id",
        "ovr-1",
        "--target-state",
        "completed",
        "--actor",
        "ops",
        "--reason",
        "test",
    )
    assert override.stdout.splitlines() == [
        "machine_id: order-p",
        "command_id: ovr-1",
        f"topic: {env['SMW_COMMAND_TOPIC']}",
        "key: acct-2",
    ]
    wait_for_state(env, "order-p", "completed")
    last = run_smw(env, "machines", "show", "order-p", "--type", "order_saga").stdout
    assert last.splitlines()[-1].split()[2:6] == ["overridden", "parked", "→", "completed"]
    assert last.splitlines()[-1].endswith("by ops  reason: test  command ovr-1")


@pytest.mark.usefixtures("worker")
def test_locks_list_shows_the_holder_and_release_frees_the_waiting_machine(
    env: dict[str, str],
) -> None:
    send_start(env, "order-h", "acct-3", {"fraud_review": True})
    wait_for_state(env, "order-h", "parked")
    send_start(env, "order-w", "acct-3", {"amount": 1})
    wait_for_state(env, "order-w", "waiting")
    listed = run_smw(env, "locks", "list").stdout.splitlines()
    assert [line.split() for line in listed] == [
        ["SCOPE", "KEY", "TYPE", "MACHINE", "SINCE"],
        ["local", "acct-3", "order_saga", "order-h", "-"],
    ]
    released = run_smw(env, "locks", "release", "acct-3", "--actor", "ops", "--reason", "stuck")
    assert released.stdout == "released 1 lock on acct-3\n"
    wait_for_state(env, "order-w", "completed")
    after = run_smw(env, "locks", "list", "--format", "json").stdout
    assert json.loads(after) == []
    needs_reason = run_smw(env, "locks", "release", "acct-3", "--actor", "ops", code=2)
    assert "Missing option '--reason'" in needs_reason.stderr


@pytest.mark.usefixtures("worker")
def test_prune_removes_finished_machines_and_their_published_events(
    env: dict[str, str],
) -> None:
    send_start(env, "order-a", "acct-4", {"amount": 1})
    send_start(env, "order-b", "acct-5", {"fraud_review": True})
    send_start(env, "order-c", "acct-6", {"amount": 2})
    for machine_id, state in (("order-a", "completed"), ("order-c", "completed")):
        wait_for_state(env, machine_id, state)
    wait_for_state(env, "order-b", "parked")
    published = 2 * ORDER_HISTORY + 3
    expected = (
        f"2 finished machines, {2 * ORDER_HISTORY} history rows, {published} published events, "
        "3 processed commands, 0 released global locks older than "
    )
    poll(
        "the relay publishing every event",
        lambda: run_smw(env, "prune", "--older-than", "0s", "--dry-run").stdout,
        lambda out: out.startswith("dry run: would prune " + expected),
    )
    pruned = run_smw(env, "prune", "--older-than", "0s", "--batch-size", "2")
    assert pruned.stdout.startswith("pruned " + expected)
    assert pruned.stdout.count("\n") == 1
    assert states(env) == {"order-b": "parked"}
    nothing = run_smw(env, "prune", "--older-than", "7d").stdout
    assert nothing.startswith(
        "pruned 0 finished machines, 0 history rows, 0 published events, "
        "0 processed commands, 0 released global locks older than "
    )


def test_usage_and_lookup_errors_have_exact_exit_codes(fresh_mysql_url: str) -> None:
    env = {**base_env(), "SMW_DATABASE_URL": fresh_mysql_url, "SMW_LOG_FORMAT": "json"}
    run_smw(env, "schema", "apply")
    unknown = run_smw(env, "send", "start", "--type", "nope", "--key", "k", code=1)
    assert unknown.stderr == (
        "error: unknown machine type 'nope'; registered types are "
        "['account_onboarding', 'order_saga']; load the module that defines it with --handlers\n"
    )
    missing = run_smw(env, "machines", "show", "ghost", "--type", "order_saga", code=1)
    assert missing.stderr == (
        "error: no order_saga machine with id 'ghost'; check the id with `smw machines list`\n"
    )
    bad = run_smw(
        env, "send", "start", "--type", "order_saga", "--key", "k", "--data", "[]", code=2
    )
    assert "Invalid value for '--data': expected a JSON object" in bad.stderr
    assert run_smw(env, "machines", "list").stdout == "no machines match\n"


@pytest.mark.parametrize(
    "args",
    [
        ("schema", "apply"),
        ("machines", "list"),
        ("machines", "show", "m-1", "--type", "order_saga"),
        ("locks", "list"),
        ("locks", "release", "acct-1", "--actor", "ops", "--reason", "r"),
        ("type-lock", "list"),
        ("type-lock", "set", "order_saga", "--kind", "reject", "--actor", "a", "--reason", "r"),
        ("prune", "--older-than", "1d"),
        ("send", "pause", "--type", "order_saga", "--id", "m-1"),
        ("worker", "--check"),
    ],
    ids=lambda args: " ".join(args[:2]),
)
def test_a_failing_command_never_shows_the_database_password(args: tuple[str, ...]) -> None:
    env = {
        **base_env(),
        "SMW_DATABASE_URL": f"mysql+mysqldb://root:{PASSWORD}@127.0.0.1:1/x",
        "SMW_KAFKA_BOOTSTRAP": "127.0.0.1:1",
        "SMW_LOG_FORMAT": "json",
        "SMW_METRICS_PORT": "0",
    }
    done = run_smw(env, *args, code=1)
    assert PASSWORD not in done.stdout
    assert PASSWORD not in done.stderr
    if args[0] == "worker":
        assert done.stdout.splitlines()[0].startswith(
            "database FAILED: mysql+mysqldb://root:***@127.0.0.1:1/x: "
        )
    else:
        assert done.stderr.startswith("error: database unreachable")
        assert done.stderr.endswith("(at mysql+mysqldb://root:***@127.0.0.1:1/x)\n")
        assert done.stderr.count("\n") == 1
