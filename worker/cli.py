"""The `smw` command line. Thin: it builds Settings and calls library functions.

Every option's environment variable comes from `worker.config.ENV_VARS`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from worker import __version__
from worker.config import (
    DEFAULT_DATABASE_URL,
    ENV_VARS,
    Settings,
    parse_kafka_config,
    read_password,
)
from worker.definition import Registry
from worker.errors import WorkerError
from worker.logs import configure, scrub
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


class SmwGroup(click.Group):
    """Turns WorkerError into a one-line message and exit code 1 (2 is click's usage error)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except WorkerError as exc:
            click.echo(f"error: {scrub(str(exc))}", err=True)
            sys.exit(1)


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
    settings = build_settings(**options)
    configure(settings.log_format, settings.log_level)
    created = open_store(settings).ensure_schema()
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
