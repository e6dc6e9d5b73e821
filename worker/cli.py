"""The `smw` command line. Thin: it builds Settings and calls library functions.

Every option's environment variable comes from `worker.config.ENV_VARS`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from datetime import timedelta
from typing import Any, TypeVar

import click
from sqlalchemy.exc import SQLAlchemyError

from worker import __version__
from worker.config import (
    DEFAULT_DATABASE_URL,
    ENV_VARS,
    Settings,
    parse_kafka_config,
    read_password,
)
from worker.definition import Registry
from worker.errors import StoreUnavailableError, WorkerError
from worker.logs import configure, scrub
from worker.messages import CommandName
from worker.states import OVERRIDE_TARGETS, State
from worker.store import Store

F = TypeVar("F", bound=Callable[..., Any])


def env_option(name: str, *flags: str, **kwargs: Any) -> Callable[[F], F]:
    """A click option whose environment variable is the one ENV_VARS names."""
    return click.option(*flags, name, envvar=ENV_VARS[name], show_envvar=True, **kwargs)


def database_options(func: F) -> F:
    for option in reversed(
        [
            env_option(
                "database_url",
                "--database-url",
                default=DEFAULT_DATABASE_URL,
                show_default=True,
                help="SQLAlchemy URL: mysql+mysqldb://user@host:3306/db, or sqlite:///file.db.",
            ),
            env_option("database_password", "--database-password", help="Database password."),
            env_option(
                "database_password_file",
                "--database-password-file",
                help="Read the database password from this file.",
            ),
            env_option(
                "handlers",
                "--handlers",
                default="handlers",
                show_default=True,
                help="Comma-separated modules that define machine types.",
            ),
            env_option(
                "log_format",
                "--log-format",
                default="auto",
                type=click.Choice(["auto", "json", "console"]),
                show_default=True,
                help="Log output: JSON, console, or auto (console on a terminal).",
            ),
            env_option(
                "log_level",
                "--log-level",
                default="info",
                show_default=True,
                type=click.Choice(["debug", "info", "warning", "error"]),
                help="Minimum log level.",
            ),
        ]
    ):
        func = option(func)
    return func


def kafka_options(func: F) -> F:
    for option in reversed(
        [
            env_option(
                "kafka_bootstrap",
                "--kafka-bootstrap",
                default="127.0.0.1:9092",
                show_default=True,
                help="Kafka bootstrap servers.",
            ),
            env_option(
                "kafka_config",
                "--kafka-config",
                help="librdkafka settings as key=value,key=value (SASL, TLS, ...).",
            ),
            env_option(
                "kafka_config_file",
                "--kafka-config-file",
                help="A properties file of librdkafka settings.",
            ),
            env_option(
                "command_topic",
                "--command-topic",
                default="statemachine.commands",
                show_default=True,
                help="Topic the commands arrive on.",
            ),
            env_option(
                "event_topic",
                "--event-topic",
                default="statemachine.events",
                show_default=True,
                help="Topic for events of types that name no topic of their own.",
            ),
            env_option(
                "dlq_topic",
                "--dlq-topic",
                default="statemachine.commands.dlq",
                show_default=True,
                help="Dead-letter topic for refused commands.",
            ),
        ]
    ):
        func = option(func)
    return func


def build_settings(**options: Any) -> Settings:
    """Settings from the CLI options (which click already filled from SMW_* variables)."""
    password = read_password(
        options.pop("database_password", None), options.pop("database_password_file", None)
    )
    kafka_config = parse_kafka_config(
        options.pop("kafka_config", None), options.pop("kafka_config_file", None)
    )
    handlers = tuple(h.strip() for h in str(options.pop("handlers", "handlers")).split(",") if h)
    present = {k: v for k, v in options.items() if v is not None}
    return Settings(
        database_password=password, kafka_config=kafka_config, handlers=handlers, **present
    )


def open_store(settings: Settings) -> Store:
    registry = Registry.from_modules(settings.handlers)
    return Store(settings.sqlalchemy_url, registry, default_topic=settings.event_topic)


def is_embedded(settings: Settings) -> bool:
    """SQLite is the embedded default: one process, commands applied in-process."""
    return settings.database_url.startswith("sqlite")


@contextmanager
def opened_store(settings: Settings) -> Iterator[Store]:
    """A store for one CLI command; on SQLite the tables are created when missing."""
    store = open_store(settings)
    try:
        if is_embedded(settings):
            store.ensure_schema()
        yield store
    except StoreUnavailableError as exc:
        raise StoreUnavailableError(f"{exc} (at {settings.safe_database_url})") from exc
    finally:
        store.engine.dispose()


def settings_from(options: dict[str, Any]) -> Settings:
    settings = build_settings(**options)
    configure(settings.log_format, settings.log_level)
    return settings


class SmwGroup(click.Group):
    """Turns WorkerError into a one-line message and exit code 1 (2 is click's usage error)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except WorkerError as exc:
            click.echo(f"error: {scrub(str(exc))}", err=True)
            sys.exit(1)
        except SQLAlchemyError as exc:
            cause = getattr(exc, "orig", None) or exc
            detail = str(cause).splitlines()[0] if str(cause) else ""
            click.echo(
                f"error: database error: {type(cause).__name__}: {scrub(detail)}; "
                "is the schema applied? run `smw schema apply`",
                err=True,
            )
            sys.exit(1)


def json_object(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    """Click callback: the option's value parsed as a JSON object."""
    del ctx, param
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise click.BadParameter(f"expected a JSON object, found invalid JSON ({exc})") from None
    if not isinstance(parsed, dict):
        kind = "null" if parsed is None else type(parsed).__name__
        raise click.BadParameter(f'expected a JSON object like {{"amount": 42}}, found a {kind}')
    return parsed


def duration(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    """Click callback: an age such as 7d, 12h, 30m, 45s or 1d12h, as a timedelta."""
    del ctx, param
    if value is None:
        return None
    from worker.retention import parse_duration  # noqa: PLC0415  # keeps --help fast

    try:
        return parse_duration(value)
    except WorkerError as exc:
        raise click.BadParameter(str(exc)) from None


def format_option(*choices: str) -> Callable[[F], F]:
    return click.option(
        "--format",
        "output_format",
        type=click.Choice(choices),
        default=choices[0],
        show_default=True,
        help="Output format.",
    )


def audit_options(verb: str) -> Callable[[F], F]:
    """--actor and --reason, both required: an operator action is recorded in the audit log."""

    def decorate(func: F) -> F:
        func = click.option("--reason", required=True, help="Why; recorded in the audit log.")(func)
        return click.option(
            "--actor", required=True, help=f"Who {verb} it; recorded in the audit log."
        )(func)

    return decorate


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str))


def echo_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain aligned table; '-' for missing values."""
    cells = [[("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [max(len(x) for x in column) for column in zip(headers, *cells, strict=True)]
    for row in (list(headers), *cells):
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


@click.group(cls=SmwGroup)
@click.version_option(__version__, prog_name="smw")
def main() -> None:
    """State Machine Worker: durable step-based state machines driven by Kafka commands."""


@main.command()
@database_options
@kafka_options
@env_option(
    "group_id",
    "--group-id",
    default="smw-workers",
    show_default=True,
    help="Kafka consumer group shared by all replicas.",
)
@env_option(
    "concurrency",
    "--concurrency",
    default=4,
    type=click.IntRange(1, 256),
    show_default=True,
    help="Executor threads running steps.",
)
@env_option(
    "metrics_port",
    "--metrics-port",
    default=9400,
    type=click.IntRange(0, 65535),
    show_default=True,
    help="Port serving /metrics and /healthz (0: none).",
)
@env_option(
    "lease_seconds",
    "--lease-seconds",
    default=30.0,
    type=click.FloatRange(1, 3600),
    show_default=True,
    help="How long a worker owns a machine between renewals.",
)
@env_option("worker_id", "--worker-id", help="This replica's id (default: host-pid).")
@click.option(
    "--check",
    is_flag=True,
    help="Check that the database and Kafka are reachable, then exit 0 or 1.",
)
def worker(check: bool, **options: Any) -> None:
    """Run the worker daemon: consume commands, run steps, publish transition events."""
    from worker import daemon  # noqa: PLC0415  # keeps `smw --help` fast

    settings = build_settings(**options)
    configure(settings.log_format, settings.log_level)
    registry = Registry.from_modules(settings.handlers)
    if check:
        sys.exit(daemon.check(settings, registry))
    sys.exit(daemon.run(settings, registry))


@main.group()
def schema() -> None:
    """Create or print the tables for the registered machine types."""


@schema.command("apply")
@database_options
def schema_apply(**options: Any) -> None:
    """Create every missing table (needs DDL rights; run once per deploy)."""
    settings = settings_from(options)
    with opened_store(settings) as store:
        created = store.ensure_schema()
    click.echo(f"schema ready on {settings.safe_database_url}: {len(created)} tables")
    for name in created:
        click.echo(f"  {name}")


@schema.command("show")
@database_options
@click.option(
    "--dialect",
    type=click.Choice(["mysql", "sqlite"]),
    default="mysql",
    show_default=True,
    help="Render the DDL for this database.",
)
def schema_show(dialect: str, **options: Any) -> None:
    """Print the CREATE TABLE statements for the registered types."""
    from worker.ddl import render_ddl  # noqa: PLC0415

    settings = build_settings(**options)
    registry = Registry.from_modules(settings.handlers)
    click.echo(render_ddl(registry, dialect))


# -- send ---------------------------------------------------------------------------------

SEND_HELP: dict[CommandName, str] = {
    CommandName.START: "Start a new machine of --type for lookup key --key, with --data.",
    CommandName.PAUSE: "Pause a machine when its current step ends (runs the step's pause hook).",
    CommandName.RESUME: "Resume a paused machine where it stopped (runs the resume hook).",
    CommandName.CANCEL: "Cancel a machine that has not finished.",
    CommandName.ROLLBACK: "Roll a machine back: compensate its completed steps, newest first.",
    CommandName.RETRY: "Retry a parked, retrying or rollback_failed machine now.",
    CommandName.OVERRIDE: (
        "Force a parked or rollback_failed machine into --target-state (needs --actor, --reason)."
    ),
}


@main.group()
def send() -> None:
    """Send a command to a machine.

    On SQLite (the embedded default) the command is applied in-process and the machine runs
    until idle; otherwise it is published to the command topic, keyed by the lookup key.
    """


def _send_command(name: CommandName) -> click.Command:
    is_start = name is CommandName.START
    is_override = name is CommandName.OVERRIDE

    def run(
        *,
        machine_type: str,
        machine_id: str | None,
        lookup_key: str | None,
        command_id: str | None,
        actor: str | None,
        reason: str | None,
        output_format: str,
        wait: bool,
        data: dict[str, Any] | None = None,
        target_state: str | None = None,
        **options: Any,
    ) -> None:
        from worker import operations  # noqa: PLC0415  # keeps `smw --help` fast

        settings = settings_from(options)
        with opened_store(settings) as store:
            command = operations.build_command(
                store,
                name,
                machine_type,
                machine_id=machine_id,
                lookup_key=lookup_key,
                data=data,
                command_id=command_id,
                actor=actor,
                reason=reason,
                target_state=target_state,
            )
            result: dict[str, Any] = {
                "machine_type": command.machine_type,
                "machine_id": command.machine_id,
                "command_id": command.command_id,
            }
            if is_embedded(settings):
                machine = operations.apply_in_process(store, command, wait_for_timers=wait)
                result.update(state=machine.state.value, error=machine.last_error)
            else:
                key = operations.message_key(store, command, lookup_key)
                operations.publish_command(settings, command, key)
                result.update(topic=settings.command_topic, key=key)
        if output_format == "json":
            echo_json(result)
            return
        for field in ("machine_id", "command_id", "state", "topic", "key"):
            if field in result:
                click.echo(f"{field}: {result[field]}")
        if result.get("error") and result["state"] != State.COMPLETED.value:
            click.echo(f"last error: {result['error']}")

    params: list[Callable[[F], F]] = [
        click.option(
            "--type", "machine_type", required=True, help="The machine type (a registered name)."
        ),
        click.option(
            "--id",
            "machine_id",
            required=not is_start,
            help="The machine id" + (" (default: a new uuid4)." if is_start else "."),
        ),
        click.option(
            "--key",
            "lookup_key",
            required=is_start,
            help="The lookup key (account, user, ...) that locks and partitions group by."
            + ("" if is_start else " Default: read from the database."),
        ),
        click.option("--command-id", help="Idempotency key of the command (default: a uuid4)."),
        click.option(
            "--actor", required=is_override, help="Who sends it; recorded in the history."
        ),
        click.option("--reason", required=is_override, help="Why; recorded in the history."),
        format_option("text", "json"),
        click.option(
            "--wait",
            is_flag=True,
            help="SQLite only: also wait out scheduled retries before printing the state.",
        ),
        database_options,
        kafka_options,
    ]
    if is_start:
        params.append(
            click.option(
                "--data",
                callback=json_object,
                metavar="JSON",
                help="The initial data, a JSON object: --data '{\"amount\": 42}'.",
            )
        )
    if is_override:
        params.append(
            click.option(
                "--target-state",
                required=True,
                type=click.Choice(sorted(s.value for s in OVERRIDE_TARGETS)),
                help="The state to force the machine into.",
            )
        )
    function: Callable[..., None] = run
    for param in reversed(params):
        function = param(function)
    return click.command(name.value, help=SEND_HELP[name])(function)


for _name in CommandName:
    send.add_command(_send_command(_name))


# -- machines -----------------------------------------------------------------------------


@main.group()
def machines() -> None:
    """Inspect machines: list them by type, state or key; show one with its history."""


@machines.command("list")
@database_options
@click.option("--type", "machine_type", help="Only this machine type (default: every type).")
@click.option(
    "--state", type=click.Choice([s.value for s in State]), help="Only machines in this state."
)
@click.option("--key", "lookup_key", help="Only machines with this lookup key.")
@click.option(
    "--limit", type=click.IntRange(1, 10_000), default=100, show_default=True, help="At most."
)
@click.option("--after", "after_id", help="Page on: only ids after this one (the last shown).")
@format_option("table", "json")
def machines_list(
    *,
    machine_type: str | None,
    state: str | None,
    lookup_key: str | None,
    limit: int,
    after_id: str | None,
    output_format: str,
    **options: Any,
) -> None:
    """List machines, ordered by id."""
    from worker import operations  # noqa: PLC0415

    settings = settings_from(options)
    with opened_store(settings) as store:
        found = operations.list_machines(
            store,
            machine_type=machine_type,
            state=state,
            lookup_key=lookup_key,
            limit=limit,
            after_id=after_id,
        )
    if output_format == "json":
        echo_json([json.loads(m.to_json()) for m in found])
        return
    if not found:
        click.echo("no machines match")
        return
    echo_table(
        ("TYPE", "ID", "KEY", "STATE", "STEP", "RETRIES", "UPDATED"),
        [
            (
                m.machine_type,
                m.id,
                m.lookup_key,
                m.state.value,
                m.step,
                m.retry_count,
                operations.iso(m.updated_at),
            )
            for m in found
        ],
    )


@machines.command("show")
@click.argument("machine_id")
@database_options
@click.option("--type", "machine_type", required=True, help="The machine's type.")
@format_option("text", "json")
def machines_show(machine_id: str, machine_type: str, output_format: str, **options: Any) -> None:
    """Show one machine: state, step, data, locks, retries, pending command and history."""
    from worker import operations  # noqa: PLC0415

    settings = settings_from(options)
    with opened_store(settings) as store:
        view = operations.show_machine(store, machine_type, machine_id)
    m = view.machine
    if output_format == "json":
        echo_json(
            {
                "machine": json.loads(m.to_json()),
                "local_lock_held": view.local_lock_held,
                "global_lock_held": view.global_lock_held,
                "history": [
                    {**asdict(e), "occurred_at": operations.iso(e.occurred_at)}
                    for e in view.history
                ],
            }
        )
        return
    names = view.step_names
    step_name = names[m.step] if m.step < len(names) else "?"
    request = "none"
    if m.request is not None:
        r = m.request
        request = f"{r.command} (command {r.command_id})"
        if r.target_state:
            request += f" target {r.target_state}"
        if r.actor:
            request += f" by {r.actor}: {r.reason}"
    lines = [
        ("type", m.machine_type),
        ("lookup key", m.lookup_key),
        ("state", m.state.value),
        ("step", f"{m.step} {step_name} ({m.completed_steps} of {len(names)} steps done)"),
        ("direction", m.direction.value),
        ("version", str(m.version)),
        ("created", operations.iso(m.created_at)),
        ("updated", operations.iso(m.updated_at)),
        ("next run", operations.iso(m.next_run_at)),
        ("local lock", _lock_text(m.uses_local_lock, view.local_lock_held)),
        ("global lock", _lock_text(m.uses_global_lock, view.global_lock_held)),
        ("retries", f"{m.retry_count} (last {operations.iso(m.last_retry_at)})"),
        ("last error", m.last_error or "-"),
        ("pending", request),
        ("lease", f"{m.lease_owner} until {operations.iso(m.lease_expires_at)}")
        if m.lease_owner
        else ("lease", "none"),
    ]
    click.echo(f"machine {m.id}")
    for label, value in lines:
        click.echo(f"  {label:<12} {value}")
    data = json.dumps(m.data, indent=2, sort_keys=True, ensure_ascii=False)
    click.echo("  data         " + data.replace("\n", "\n               "))
    click.echo(f"history ({len(view.history)} transitions)")
    for line in operations.timeline(view.history):
        click.echo(f"  {line}")


def _lock_text(used: bool, held: bool) -> str:
    if not used:
        return "not used"
    return "held" if held else "released"


# -- locks --------------------------------------------------------------------------------


@main.group()
def locks() -> None:
    """Business locks on lookup keys: list them, or release one by force (audited)."""


@locks.command("list")
@database_options
@format_option("table", "json")
def locks_list(output_format: str, **options: Any) -> None:
    """List every held global and local lock."""
    from worker import operations  # noqa: PLC0415

    settings = settings_from(options)
    with opened_store(settings) as store:
        held = operations.list_locks(store)
    if output_format == "json":
        echo_json(
            [
                {
                    "scope": h.scope,
                    "lookup_key": h.lookup_key,
                    "machine_type": h.machine_type,
                    "machine_id": h.machine_id,
                    "since": None if h.since is None else operations.iso(h.since),
                }
                for h in held
            ]
        )
        return
    if not held:
        click.echo("no locks held")
        return
    echo_table(
        ("SCOPE", "KEY", "TYPE", "MACHINE", "SINCE"),
        [
            (
                h.scope,
                h.lookup_key,
                h.machine_type,
                h.machine_id,
                None if h.since is None else operations.iso(h.since),
            )
            for h in held
        ],
    )


@locks.command("release")
@click.argument("lookup_key")
@database_options
@audit_options("releases")
def locks_release(lookup_key: str, actor: str, reason: str, **options: Any) -> None:
    """Release every lock on LOOKUP_KEY by force; the next waiting machine starts."""
    from worker import operations  # noqa: PLC0415

    settings = settings_from(options)
    with opened_store(settings) as store:
        released = operations.release_locks(store, lookup_key, actor=actor, reason=reason)
    click.echo(f"released {released} lock{'' if released == 1 else 's'} on {lookup_key}")


# -- type locks ---------------------------------------------------------------------------


@main.group("type-lock")
def type_lock() -> None:
    """Locks on a whole machine type: reject new machines, or make them sleep."""


@type_lock.command("set")
@click.argument("machine_type")
@database_options
@click.option(
    "--kind",
    required=True,
    type=click.Choice(["reject", "sleep"]),
    help="reject: refuse new machines; sleep: new machines wait until the lock lifts.",
)
@click.option("--until", help="When the lock lifts, ISO 8601 (UTC if no zone); default: never.")
@audit_options("sets")
def type_lock_set(
    machine_type: str, kind: str, until: str | None, actor: str, reason: str, **options: Any
) -> None:
    """Lock MACHINE_TYPE (replacing any lock it has)."""
    from worker import operations  # noqa: PLC0415

    settings = settings_from(options)
    lifts = operations.parse_until(until)
    with opened_store(settings) as store:
        lock = operations.set_type_lock(
            store, machine_type, kind, until=lifts, actor=actor, reason=reason
        )
    click.echo(f"{lock.machine_type}: {lock.kind} lock until {operations.iso(lock.until)}")


@type_lock.command("clear")
@click.argument("machine_type")
@database_options
@audit_options("clears")
def type_lock_clear(machine_type: str, actor: str, reason: str, **options: Any) -> None:
    """Lift the lock on MACHINE_TYPE; machines that slept on it become due at once."""
    from worker import operations  # noqa: PLC0415

    settings = settings_from(options)
    with opened_store(settings) as store:
        removed = operations.clear_type_lock(store, machine_type, actor=actor, reason=reason)
    click.echo(f"{machine_type}: {'lock cleared' if removed else 'was not locked'}")


@type_lock.command("list")
@database_options
@format_option("table", "json")
def type_lock_list(output_format: str, **options: Any) -> None:
    """List the type locks in force."""
    from worker import operations  # noqa: PLC0415

    settings = settings_from(options)
    with opened_store(settings) as store:
        found = operations.list_type_locks(store)
    rows = [
        {
            "machine_type": t.machine_type,
            "kind": t.kind.value,
            "since": operations.iso(t.since),
            "until": None if t.until is None else operations.iso(t.until),
            "actor": t.actor,
            "reason": t.reason,
        }
        for t in found
    ]
    if output_format == "json":
        echo_json(rows)
        return
    if not rows:
        click.echo("no type locks")
        return
    keys = ("machine_type", "kind", "since", "until", "actor", "reason")
    echo_table(
        ("TYPE", "KIND", "SINCE", "UNTIL", "ACTOR", "REASON"),
        [[r[k] for k in keys] for r in rows],
    )


# -- prune --------------------------------------------------------------------------------


@main.command()
@database_options
@click.option(
    "--older-than",
    "older_than",
    required=True,
    callback=duration,
    metavar="DURATION",
    help="Age by the database clock: 7d, 12h, 30m, 45s, 1d12h. 0s prunes everything finished.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, 100_000),
    default=500,
    show_default=True,
    help="Rows per transaction.",
)
@click.option("--dry-run", is_flag=True, help="Count what would go; delete nothing.")
def prune(older_than: timedelta, batch_size: int, dry_run: bool, **options: Any) -> None:
    """Delete finished machines, their history, published events and old command records.

    Terminal machines (completed, failed, rollback_completed, cancelled) last updated before
    the cutoff go with their history. Live machines and unpublished events are never touched.
    """
    from worker import retention  # noqa: PLC0415
    from worker.operations import iso  # noqa: PLC0415

    settings = settings_from(options)
    with opened_store(settings) as store:
        cutoff = retention.cutoff_for(store, older_than)
        planned = retention.count(store, cutoff)
        if dry_run:
            click.echo(f"dry run: would prune {planned.summary()} older than {iso(cutoff)}")
            return
        with click.progressbar(
            length=max(planned.total, 1), label="pruning", file=sys.stderr
        ) as bar:
            done = retention.prune(store, cutoff, batch_size=batch_size, progress=bar.update)
    click.echo(f"pruned {done.summary()} older than {iso(cutoff)}")


# -- demo ---------------------------------------------------------------------------------


@main.command()
@click.option(
    "--database-url",
    help="Run on this database instead of a fresh SQLite file in a temporary folder.",
)
def demo(database_url: str | None) -> None:
    """Run the example machines end to end on SQLite, with no Kafka and no MySQL.

    Shows the success, retry, rollback, park/override, lock and pause/resume paths as they
    happen, then a summary. Exits 0 only if every machine ends where its script expects.
    """
    # Deliberately no SMW_DATABASE_URL: `make` exports it for the MariaDB test tiers, and the
    # demo must run with no services unless --database-url asks for one.
    from worker.demo import run_demo  # noqa: PLC0415

    configure("console", "warning")
    result = run_demo(database_url)
    sys.exit(0 if result.ok else 1)
