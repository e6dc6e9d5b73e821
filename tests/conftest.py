"""Shared fixtures: tiers by folder, a fresh MariaDB/MySQL database per test, services checks.

Integration and acceptance tests need a real MySQL-compatible database and a real Kafka
broker (`make services` starts both). Under CI a missing service fails the test; elsewhere
it is skipped with the same message.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from worker.definition import Registry
from worker.store import Store

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATABASE_URL = "mysql+mysqldb://root@127.0.0.1:3306/smw_test"
DEFAULT_KAFKA = "127.0.0.1:9092"
HOW_TO_START = (
    "start them with `make services` (local MariaDB and Kafka), or point SMW_DATABASE_URL and "
    "SMW_KAFKA_BOOTSTRAP at your own MySQL 8 and Kafka"
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).relative_to(ROOT / "tests").parts
        tier = parts[0] if len(parts) > 1 else "unit"
        if tier in ("unit", "integration", "acceptance") and item.get_closest_marker(tier) is None:
            item.add_marker(getattr(pytest.mark, tier))


def service_missing(what: str, error: Exception) -> None:
    message = f"{what} is not reachable ({type(error).__name__}); {HOW_TO_START}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def mysql_server_url() -> str:
    return os.environ.get("SMW_DATABASE_URL", DEFAULT_DATABASE_URL)


def kafka_bootstrap() -> str:
    return os.environ.get("SMW_KAFKA_BOOTSTRAP", DEFAULT_KAFKA)


@pytest.fixture
def fresh_mysql_url() -> Iterator[str]:
    """A new, empty database on the test server; dropped afterwards."""
    base = make_url(mysql_server_url())
    name = f"smw_t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base.set(database=""), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"))
    except Exception as exc:  # noqa: BLE001  # any failure here means the service is missing
        admin.dispose()
        service_missing("MySQL/MariaDB", exc)
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'smw.db'}"


@pytest.fixture
def example_registry() -> Registry:
    return Registry.from_modules(["handlers"])


@pytest.fixture
def kafka() -> str:
    """The bootstrap address of a reachable Kafka broker."""
    from confluent_kafka.admin import AdminClient  # noqa: PLC0415

    bootstrap = kafka_bootstrap()
    try:
        AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10)
    except Exception as exc:  # noqa: BLE001  # KafkaException of any kind: not reachable
        service_missing("Kafka", exc)
    return bootstrap


def make_store(url: str, registry: Registry) -> Store:
    store = Store(url, registry)
    store.ensure_schema()
    return store
