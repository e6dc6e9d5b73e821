"""Settings, and the one place where CLI options map to SMW_* environment variables."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Self

from sqlalchemy.engine import make_url

from worker.errors import WorkerError

ENV_VARS: dict[str, str] = {
    "database_url": "SMW_DATABASE_URL",
    "database_password": "SMW_DATABASE_PASSWORD",
    "database_password_file": "SMW_DATABASE_PASSWORD_FILE",
    "kafka_bootstrap": "SMW_KAFKA_BOOTSTRAP",
    "kafka_config": "SMW_KAFKA_CONFIG",
    "kafka_config_file": "SMW_KAFKA_CONFIG_FILE",
    "command_topic": "SMW_COMMAND_TOPIC",
    "event_topic": "SMW_EVENT_TOPIC",
    "dlq_topic": "SMW_DLQ_TOPIC",
    "group_id": "SMW_GROUP_ID",
    "concurrency": "SMW_CONCURRENCY",
    "metrics_port": "SMW_METRICS_PORT",
    "handlers": "SMW_HANDLERS",
    "lease_seconds": "SMW_LEASE_SECONDS",
    "log_format": "SMW_LOG_FORMAT",
    "log_level": "SMW_LOG_LEVEL",
    "worker_id": "SMW_WORKER_ID",
}
"""Option name -> environment variable. The CLI declares every option from this table."""

DEFAULT_DATABASE_URL = "sqlite:///smw.db"
_SECRET_KEY = re.compile(
    r"password|passphrase|secret|token|credential|sasl\.jaas|oauthbearer\.config|key\.pem",
    re.IGNORECASE,
)
"""librdkafka settings whose values are masked in logs (librdkafka marks these sensitive)."""


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class Settings:
    """Everything a worker process is configured with. Secrets never appear in `repr`."""

    database_url: str = field(default=DEFAULT_DATABASE_URL, repr=False)
    """May carry a password; `safe_database_url` is the one to show."""
    database_password: str | None = field(default=None, repr=False)
    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_config: dict[str, str] = field(default_factory=dict, repr=False)
    command_topic: str = "statemachine.commands"
    event_topic: str = "statemachine.events"
    dlq_topic: str = "statemachine.commands.dlq"
    group_id: str = "smw-workers"
    concurrency: int = 4
    metrics_port: int = 9400
    handlers: tuple[str, ...] = ("handlers",)
    lease_seconds: float = 30.0
    log_format: str = "auto"
    log_level: str = "info"
    worker_id: str = field(default_factory=default_worker_id)
    poll_interval: float = 0.5

    def evolve(self, **changes: Any) -> Self:
        return replace(self, **changes)

    @property
    def sqlalchemy_url(self) -> str:
        """The database URL with the password filled in. Never log this value."""
        url = make_url(self.database_url)
        if self.database_password:
            url = url.set(password=self.database_password)
        return url.render_as_string(hide_password=False)

    @property
    def safe_database_url(self) -> str:
        """The database URL with any password masked, for logs and error messages."""
        return redact_url(self.database_url)

    def kafka_common(self) -> dict[str, str]:
        """librdkafka settings shared by every client: bootstrap plus the passthrough."""
        return {"bootstrap.servers": self.kafka_bootstrap, **self.kafka_config}


def redact_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001  # an unparsable URL is shown only as its scheme
        return url.split(":", 1)[0] + "://***"


def redact_config(config: dict[str, str]) -> dict[str, str]:
    return {k: ("***" if _SECRET_KEY.search(k) else v) for k, v in config.items()}


def parse_kafka_config(pairs: str | None, file: str | None) -> dict[str, str]:
    """`key=value,key=value` plus a properties file (file first, pairs override)."""
    config: dict[str, str] = {}
    if file:
        for number, line in enumerate(Path(file).read_text(encoding="utf-8").splitlines(), 1):
            stripped = line.strip()
            if stripped and not stripped.startswith(("#", "!")):
                _put(config, stripped, f"{file} line {number}")
    for number, item in enumerate((pairs or "").split(","), 1):
        if item.strip():
            _put(config, item.strip(), f"SMW_KAFKA_CONFIG item {number}")
    return config


def _put(config: dict[str, str], item: str, source: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        # The item itself is not shown: it may be part of a secret (a value with a comma).
        raise WorkerError(
            f"{source}: expected a key=value librdkafka setting; a value that contains a "
            "comma belongs in SMW_KAFKA_CONFIG_FILE"
        )
    config[key.strip()] = value.strip()


def read_password(password: str | None, password_file: str | None) -> str | None:
    if password_file:
        try:
            return Path(password_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise WorkerError(
                f"cannot read the database password file {password_file}: {exc.strerror}; "
                "check SMW_DATABASE_PASSWORD_FILE"
            ) from exc
    return password
