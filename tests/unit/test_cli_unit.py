"""The `smw` commands in-process (click's CliRunner) on a temporary SQLite database."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result
from sqlalchemy import create_engine, select

from worker import cli, operations, tables
from worker.cli import main
from worker.config import ENV_VARS, Settings
from worker.definition import Registry
from worker.errors import WorkerError
from worker.kafka_io import MemorySink
from worker.messages import CommandName, decode_command
from worker.store import Store

pytestmark = pytest.mark.unit

ORDER_STEPS = 5
ORDER_HISTORY = 2 + ORDER_STEPS  # created, started, one step_succeeded per step
ONBOARDING_HISTORY = 2 + 3
UNKNOWN_TYPE = (
    "error: unknown machine type 'nope'; registered types are "
    "['account_onboarding', 'order_saga']; load the module that defines it with --handlers"
)

Smw = Callable[..., Result]


@pytest.fixture(autouse=True)
def _keep_test_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI configures process-wide logging; the tests keep pytest's own handlers."""
    monkeypatch.setattr(cli, "configure", lambda *args, **kwargs: None)


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'cli.db'}"


@pytest.fixture
def smw(db_url: str) -> Smw:
    """Run `smw ARGS --database-url <temp SQLite>`; check the exit code unless told not to."""
    runner = CliRunner()

    def invoke(*args: str, code: int = 0, database: bool = True) -> Result:
        argv = [*args, "--database-url", db_url] if database else list(args)
        result = runner.invoke(main, argv, catch_exceptions=False)
        assert result.exit_code == code, result.output
        return result

    return invoke


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    opened = Store(db_url, Registry.from_modules(["handlers"]))
    opened.ensure_schema()
    yield opened
    opened.engine.dispose()


def lines(result: Result) -> list[str]:
    return result.stdout.splitlines()


def start(smw: Smw, machine_id: str, key: str, data: dict[str, Any] | None = None) -> Result:
    return smw(
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
        json.dumps(data or {"amount": 42}),
    )


# -- send ---------------------------------------------------------------------------------


def test_send_start_on_sqlite_applies_in_process_and_prints_the_final_state(smw: Smw) -> None:
    result = start(smw, "order-1", "acct-1")
    assert lines(result) == ["machine_id: order-1", "command_id: cmd-order-1", "state: completed"]
    assert result.stderr == ""


def test_send_start_without_an_id_generates_one_and_prints_it(smw: Smw, store: Store) -> None:
    result = smw("send", "start", "--type", "order_saga", "--key", "acct-1", "--format", "json")
    printed = json.loads(result.stdout)
    assert printed["state"] == "completed"
    assert printed["error"] is None
    assert store.load("order_saga", printed["machine_id"]).lookup_key == "acct-1"


def test_send_start_json_output_has_exact_fields(smw: Smw) -> None:
    result = smw(
        "send",
        "start",
        "--type",
        "order_saga",
        "--id",
        "o-9",
        "--key",
        "acct-9",
        "--command-id",
        "c-9",
        "--data",
        '{"fraud_review": true}',
        "--format",
        "json",
    )
    assert json.loads(result.stdout) == {
        "command_id": "c-9",
        "error": "order flagged for fraud review",
        "machine_id": "o-9",
        "machine_type": "order_saga",
        "state": "parked",
    }


def test_override_of_a_parked_machine_completes_it_and_is_recorded(smw: Smw) -> None:
    parked = start(smw, "order-p", "acct-p", {"fraud_review": True})
    assert lines(parked) == [
        "machine_id: order-p",
        "command_id: cmd-order-p",
        "state: parked",
        "last error: order flagged for fraud review",
    ]
    result = smw(
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
        "manual approval",
    )
    assert lines(result) == ["machine_id: order-p", "command_id: ovr-1", "state: completed"]
    last = lines(smw("machines", "show", "order-p", "--type", "order_saga"))[-1]
    assert last.split()[0::2][:3] == ["4", "overridden", "→"]
    assert last.split()[3:6] == ["parked", "→", "completed"]
    assert last.endswith("by ops  reason: manual approval  command ovr-1")


def test_override_needs_actor_reason_and_target_state(smw: Smw) -> None:
    result = smw("send", "override", "--type", "order_saga", "--id", "x", code=2)
    assert "Missing option '--actor'" in result.output


def test_pause_of_a_finished_machine_is_refused_in_one_line(smw: Smw) -> None:
    start(smw, "order-1", "acct-1")
    result = smw("send", "pause", "--type", "order_saga", "--id", "order-1", code=1)
    assert result.stderr == "error: pause is not allowed for a machine in state 'completed'\n"
    assert result.stdout == ""


def test_send_to_kafka_publishes_keyed_by_the_stored_lookup_key(
    smw: Smw, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not SQLite: the command is published (here to a fake producer), keyed by lookup key."""
    start(smw, "order-p", "acct-p", {"fraud_review": True})
    sink = MemorySink()
    configs: list[Settings] = []

    def make_producer(settings: Settings) -> None:
        configs.append(settings)

    monkeypatch.setattr(operations, "make_producer", make_producer)
    monkeypatch.setattr(operations, "KafkaEventSink", lambda producer: sink)
    monkeypatch.setattr(cli, "is_embedded", lambda settings: False)
    result = smw(
        "send",
        "cancel",
        "--type",
        "order_saga",
        "--id",
        "order-p",
        "--command-id",
        "cx-1",
        "--kafka-bootstrap",
        "kafka.test:9092",
        "--command-topic",
        "cmds.test",
    )
    assert lines(result) == [
        "machine_id: order-p",
        "command_id: cx-1",
        "topic: cmds.test",
        "key: acct-p",
    ]
    (config,) = configs
    assert config.kafka_bootstrap == "kafka.test:9092"
    assert config.kafka_config == {"message.timeout.ms": "15000"}
    (published,) = sink.published
    assert (published.topic, published.key, published.headers) == ("cmds.test", b"acct-p", ())
    decoded = decode_command(published.value)
    assert (decoded.command, decoded.machine_id, decoded.command_id) == (
        CommandName.CANCEL,
        "order-p",
        "cx-1",
    )


def test_an_unacknowledged_command_is_a_one_line_error() -> None:
    sink = MemorySink()
    sink.failure = "Local: Message timed out"
    command = decode_command(
        b'{"command_id":"c","command":"start","machine_type":"order_saga","lookup_key":"k"}'
    )
    with pytest.raises(WorkerError) as caught:
        operations.publish_command(
            Settings(kafka_bootstrap="nowhere:9092"), command, "k", sink=sink
        )
    assert str(caught.value) == (
        "the command was not acknowledged by topic 'statemachine.commands' at nowhere:9092 "
        "within 15s (_TRANSPORT: Local: Message timed out); check SMW_KAFKA_BOOTSTRAP and "
        "the broker, then send it again with the same --command-id (a repeat is applied once)"
    )


# -- errors -------------------------------------------------------------------------------


def test_unknown_type_is_exit_1_naming_the_registered_types(smw: Smw) -> None:
    result = smw("send", "start", "--type", "nope", "--key", "k", code=1)
    assert result.stderr == UNKNOWN_TYPE + "\n"
    listed = smw("machines", "list", "--type", "nope", code=1)
    assert listed.stderr == UNKNOWN_TYPE + "\n"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("{bad", "Invalid value for '--data': expected a JSON object, found invalid JSON"),
        ("[1, 2]", "Invalid value for '--data': expected a JSON object like {\"amount\": 42}"),
        ("null", "found a null"),
    ],
)
def test_bad_data_is_a_usage_error(smw: Smw, data: str, message: str) -> None:
    result = smw("send", "start", "--type", "order_saga", "--key", "k", "--data", data, code=2)
    assert message in result.stderr


def test_machine_not_found_is_exit_1(smw: Smw) -> None:
    result = smw("machines", "show", "missing", "--type", "order_saga", code=1)
    assert result.stderr == (
        "error: no order_saga machine with id 'missing'; check the id with `smw machines list`\n"
    )
    sent = smw("send", "resume", "--type", "order_saga", "--id", "missing", code=1)
    assert sent.stderr == result.stderr


def test_bad_duration_is_a_usage_error(smw: Smw) -> None:
    result = smw("prune", "--older-than", "7 days", code=2)
    assert "duration '7 days' is not understood" in result.stderr


def test_database_errors_never_show_the_password(tmp_path: Path) -> None:
    runner = CliRunner()
    url = "mysql+mysqldb://root:s3cretpw@127.0.0.1:1/x"
    result = runner.invoke(main, ["machines", "list", "--database-url", url])
    assert result.exit_code == 1
    assert "s3cretpw" not in result.output
    assert result.stderr.startswith("error: database unreachable")
    assert result.stderr.rstrip().endswith("(at mysql+mysqldb://root:***@127.0.0.1:1/x)")


# -- machines -----------------------------------------------------------------------------


def test_machines_list_table_filters_and_pages(smw: Smw, store: Store) -> None:
    start(smw, "order-a", "acct-1")
    start(smw, "order-b", "acct-2", {"fraud_review": True})
    start(smw, "order-c", "acct-1")
    table = lines(smw("machines", "list"))
    assert table[0].split() == ["TYPE", "ID", "KEY", "STATE", "STEP", "RETRIES", "UPDATED"]
    rows = [row.split()[:6] for row in table[1:]]
    assert rows == [
        ["order_saga", "order-a", "acct-1", "completed", "4", "0"],
        ["order_saga", "order-b", "acct-2", "parked", "0", "0"],
        ["order_saga", "order-c", "acct-1", "completed", "4", "0"],
    ]
    parked = json.loads(smw("machines", "list", "--state", "parked", "--format", "json").stdout)
    assert [(m["id"], m["state"], m["lookup_key"]) for m in parked] == [
        ("order-b", "parked", "acct-2")
    ]
    by_key = json.loads(smw("machines", "list", "--key", "acct-1", "--format", "json").stdout)
    assert [m["id"] for m in by_key] == ["order-a", "order-c"]
    page = json.loads(
        smw("machines", "list", "--limit", "1", "--after", "order-a", "--format", "json").stdout
    )
    assert [m["id"] for m in page] == ["order-b"]
    assert lines(smw("machines", "list", "--type", "account_onboarding")) == ["no machines match"]


def test_machines_show_prints_state_data_locks_and_the_timeline(smw: Smw) -> None:
    start(smw, "order-p", "acct-p", {"fraud_review": True, "amount": 3})
    shown = lines(smw("machines", "show", "order-p", "--type", "order_saga"))
    assert shown[0] == "machine order-p"
    fields = {line[2:14].strip(): line[15:] for line in shown[1:17] if line.startswith("  ")}
    assert fields["type"] == "order_saga"
    assert fields["lookup key"] == "acct-p"
    assert fields["state"] == "parked"
    assert fields["step"] == "0 validate_order (0 of 5 steps done)"
    assert fields["local lock"] == "held"
    assert fields["global lock"] == "not used"
    assert fields["last error"] == "order flagged for fraud review"
    assert fields["pending"] == "none"
    data_at = shown.index("  data         {")
    assert shown[data_at + 1 : data_at + 4] == [
        '                 "amount": 3,',
        '                 "fraud_review": true',
        "               }",
    ]
    history_at = shown.index("history (3 transitions)")
    events = [line.split()[2:6] for line in shown[history_at + 2 :]]
    assert events == [
        ["created", "pending", "→", "pending"],
        ["started", "pending", "→", "open"],
        ["parked", "open", "→", "parked"],
    ]
    assert shown[history_at + 2].endswith("command cmd-order-p")
    assert shown[-1].endswith("0 validate_order         error: order flagged for fraud review")


def test_machines_show_json_has_machine_history_and_lock_flags(smw: Smw) -> None:
    start(smw, "order-a", "acct-1")
    shown = json.loads(
        smw("machines", "show", "order-a", "--type", "order_saga", "--format", "json").stdout
    )
    assert shown["machine"]["state"] == "completed"
    assert shown["machine"]["data"]["charged"] == 42
    assert (shown["local_lock_held"], shown["global_lock_held"]) == (False, False)
    assert [h["event"] for h in shown["history"]] == ["created", "started"] + [
        "step_succeeded"
    ] * ORDER_STEPS
    assert [h["sequence"] for h in shown["history"]] == list(range(1, ORDER_HISTORY + 1))


# -- locks --------------------------------------------------------------------------------


def test_locks_list_and_release_with_audit(smw: Smw, db_url: str) -> None:
    assert lines(smw("locks", "list")) == ["no locks held"]
    start(smw, "order-p", "acct-p", {"fraud_review": True})
    table = lines(smw("locks", "list"))
    assert [row.split() for row in table] == [
        ["SCOPE", "KEY", "TYPE", "MACHINE", "SINCE"],
        ["local", "acct-p", "order_saga", "order-p", "-"],
    ]
    listed = json.loads(smw("locks", "list", "--format", "json").stdout)
    assert listed == [
        {
            "lookup_key": "acct-p",
            "machine_id": "order-p",
            "machine_type": "order_saga",
            "scope": "local",
            "since": None,
        }
    ]
    released = smw("locks", "release", "acct-p", "--actor", "ops", "--reason", "stuck")
    assert lines(released) == ["released 1 lock on acct-p"]
    assert lines(smw("locks", "list")) == ["no locks held"]
    again = smw("locks", "release", "acct-p", "--actor", "ops", "--reason", "stuck")
    assert lines(again) == ["released 0 locks on acct-p"]
    engine = create_engine(db_url)
    with engine.connect() as conn:
        audit = conn.execute(
            select(
                tables.operator_audit.c.Action,
                tables.operator_audit.c.Target,
                tables.operator_audit.c.Actor,
                tables.operator_audit.c.Reason,
            ).order_by(tables.operator_audit.c.ID)
        ).all()
    engine.dispose()
    assert [tuple(r) for r in audit] == [("lock.release", "lookup_key=acct-p", "ops", "stuck")] * 2


def test_locks_release_needs_actor_and_reason(smw: Smw) -> None:
    smw("locks", "release", "acct-p", "--actor", "ops", code=2)


def test_releasing_a_key_starts_the_machine_waiting_for_it(smw: Smw, store: Store) -> None:
    """An onboarding (global lock) waits behind a parked order's local lock until released."""
    start(smw, "order-p", "acct-g", {"fraud_review": True})
    waiting = smw(
        "send", "start", "--type", "account_onboarding", "--id", "onb-1", "--key", "acct-g"
    )
    assert lines(waiting)[-1] == "state: waiting"
    released = smw("locks", "release", "acct-g", "--actor", "ops", "--reason", "unstick")
    assert lines(released) == ["released 1 lock on acct-g"]
    operations.Engine(store, worker_id="t").run_until_idle()
    assert store.load("account_onboarding", "onb-1").state.value == "completed"


# -- type locks ---------------------------------------------------------------------------


def test_type_lock_set_list_clear(smw: Smw) -> None:
    assert lines(smw("type-lock", "list")) == ["no type locks"]
    set_result = smw(
        "type-lock",
        "set",
        "order_saga",
        "--kind",
        "reject",
        "--until",
        "2099-01-31T18:00:00Z",
        "--actor",
        "ops",
        "--reason",
        "maintenance",
    )
    assert lines(set_result) == ["order_saga: reject lock until 2099-01-31T18:00:00.000Z"]
    table = lines(smw("type-lock", "list"))
    assert table[0].split() == ["TYPE", "KIND", "SINCE", "UNTIL", "ACTOR", "REASON"]
    row = table[1].split()
    assert [row[0], row[1], row[3], row[4], row[5]] == [
        "order_saga",
        "reject",
        "2099-01-31T18:00:00.000Z",
        "ops",
        "maintenance",
    ]
    refused = smw("send", "start", "--type", "order_saga", "--key", "k", code=1)
    assert refused.stderr == (
        "error: machine type 'order_saga' is under an immediate-rejection lock (maintenance); "
        "clear it with `smw type-lock clear` or wait for its unlock time\n"
    )
    cleared = smw("type-lock", "clear", "order_saga", "--actor", "ops", "--reason", "done")
    assert lines(cleared) == ["order_saga: lock cleared"]
    assert lines(smw("type-lock", "list", "--format", "json")) == ["[]"]
    again = smw("type-lock", "clear", "order_saga", "--actor", "ops", "--reason", "done")
    assert lines(again) == ["order_saga: was not locked"]


def test_sleep_type_lock_makes_new_machines_wait(smw: Smw) -> None:
    smw("type-lock", "set", "order_saga", "--kind", "sleep", "--actor", "ops", "--reason", "r")
    listed = json.loads(smw("type-lock", "list", "--format", "json").stdout)
    assert [(t["machine_type"], t["kind"], t["until"]) for t in listed] == [
        ("order_saga", "sleep", None)
    ]
    assert lines(start(smw, "order-s", "acct-s"))[-1] == "state: waiting"


def test_type_lock_errors(smw: Smw) -> None:
    bad_time = smw(
        "type-lock", "set", "order_saga", "--kind", "sleep", "--until", "soon",
        "--actor", "a", "--reason", "r", code=1,
    )  # fmt: skip
    assert bad_time.stderr == (
        "error: --until 'soon' is not an ISO 8601 time; expected e.g. 2030-01-31T18:00:00Z\n"
    )
    past = smw(
        "type-lock", "set", "order_saga", "--kind", "sleep", "--until", "2001-01-01T00:00:00",
        "--actor", "a", "--reason", "r", code=1,
    )  # fmt: skip
    assert "is already past on the database clock" in past.stderr
    unknown = smw("type-lock", "clear", "nope", "--actor", "a", "--reason", "r", code=1)
    assert unknown.stderr == UNKNOWN_TYPE + "\n"
    smw(
        "type-lock", "set", "order_saga", "--kind", "later", "--actor", "a", "--reason", "r", code=2
    )


# -- prune --------------------------------------------------------------------------------


def test_prune_dry_run_then_for_real_with_exact_counts(smw: Smw) -> None:
    start(smw, "order-a", "acct-1")
    start(smw, "order-b", "acct-2")
    start(smw, "order-p", "acct-3", {"fraud_review": True})
    smw("send", "start", "--type", "account_onboarding", "--id", "onb-1", "--key", "acct-4")
    history = 2 * ORDER_HISTORY + ONBOARDING_HISTORY
    expected = (
        f"3 finished machines, {history} history rows, 0 published events, "
        "4 processed commands, 1 released global locks older than "
    )
    kept = smw("prune", "--older-than", "7d", "--dry-run").stdout
    assert kept.startswith("dry run: would prune 0 finished machines, 0 history rows, 0 ")
    dry = smw("prune", "--older-than", "0s", "--dry-run").stdout
    assert dry.startswith("dry run: would prune " + expected)
    assert len(lines(smw("machines", "list"))) == 1 + 4
    done = smw("prune", "--older-than", "0s", "--batch-size", "1")
    assert done.stdout.startswith("pruned " + expected)
    assert "pruning" in done.stderr
    remaining = json.loads(smw("machines", "list", "--format", "json").stdout)
    assert [(m["id"], m["state"]) for m in remaining] == [("order-p", "parked")]
    shown = lines(smw("machines", "show", "order-p", "--type", "order_saga"))
    assert "history (3 transitions)" in shown
    again = smw("prune", "--older-than", "0s").stdout
    assert again.startswith(
        "pruned 0 finished machines, 0 history rows, 0 published events, "
        "0 processed commands, 0 released global locks"
    )


# -- the command tree ---------------------------------------------------------------------


def walk(command: click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from walk(sub, (*path, name))


def resolve(path: tuple[str, ...]) -> click.Command:
    command: click.Command = main
    for name in path:
        assert isinstance(command, click.Group)
        command = command.commands[name]
    return command


def test_every_option_with_an_env_var_uses_the_name_from_env_vars() -> None:
    checked = 0
    for path in walk(main):
        for param in resolve(path).params:
            if isinstance(param, click.Option) and param.envvar:
                assert param.name in ENV_VARS, (path, param.name)
                assert param.envvar == ENV_VARS[param.name], (path, param.name)
                checked += 1
    assert checked > 50


def test_commands_that_touch_the_database_take_the_database_options() -> None:
    for path in walk(main):
        command = resolve(path)
        if isinstance(command, click.Group) or path == ("demo",):
            continue
        names = {p.name for p in command.params}
        assert {"database_url", "database_password_file", "handlers"} <= names, path
    for name in CommandName:
        names = {p.name for p in resolve(("send", name.value)).params}
        assert {"kafka_bootstrap", "command_topic", "kafka_config"} <= names


def test_demo_does_not_read_smw_database_url() -> None:
    """`make` exports SMW_DATABASE_URL for MariaDB; the demo must still need no services."""
    (option,) = [p for p in resolve(("demo",)).params if p.name == "database_url"]
    assert option.envvar is None


@pytest.mark.parametrize("path", list(walk(main)), ids=lambda p: " ".join(p) or "smw")
def test_every_command_has_useful_help(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(main, [*path, "--help"], prog_name="smw")
    assert result.exit_code == 0
    assert result.stdout.startswith(f"Usage: smw {' '.join(path)}".rstrip())
    command = resolve(path)
    assert command.help, path
    for param in command.params:
        if isinstance(param, click.Option) and param.name != "help":
            assert param.help, (path, param.name)
