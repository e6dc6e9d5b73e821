"""Secrets against the real services: a database user with a password, a worker that runs.

The unit tests (tests/unit/test_secrets.py) prove that failing commands and a worker on
SQLite never print a secret. Here the password opens a real MariaDB/MySQL database: a worker
runs a machine to completion and `smw` commands succeed, and neither their output nor the
worker's log (at debug level) ever holds the password; nor does a refused login.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from tests.integration.daemon_helpers import SMW, Stack, start

pytestmark = pytest.mark.integration

PASSWORD = f"Live:Pw@{uuid.uuid4().hex[:10]}/x%"  # characters a URL has to escape


@pytest.fixture
def user(fresh_mysql_url: str) -> Iterator[str]:
    """A database user that needs PASSWORD, allowed on the test's database; its URL."""
    url = make_url(fresh_mysql_url)
    name = f"smw_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE USER '{name}'@'%' IDENTIFIED BY :pw"), {"pw": PASSWORD})
        conn.execute(sa.text(f"GRANT ALL ON `{url.database}`.* TO '{name}'@'%'"))
    try:
        secret = quote(PASSWORD, safe="")
        yield f"mysql+mysqldb://{name}:{secret}@{url.host}:{url.port or 3306}/{url.database}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP USER IF EXISTS '{name}'@'%'"))
        admin.dispose()


@pytest.fixture
def stack(user: str, kafka: str, tmp_path: Path) -> Iterator[Stack]:
    stack = Stack(user, kafka, tmp_path)
    try:
        yield stack
    finally:
        stack.close()


def leaks(text: str) -> list[str]:
    secrets = [PASSWORD, quote(PASSWORD, safe=""), PASSWORD.split("@")[1]]
    return [s for s in secrets if s in text]


@pytest.mark.timeout(180)
def test_a_worker_and_the_cli_on_a_password_database_never_print_the_password(
    stack: Stack, user: str
) -> None:
    worker = stack.spawn("w1", SMW_LOG_LEVEL="debug")
    machine_id = f"secret-{stack.suffix}"
    stack.send((f"acct-{machine_id}", start(machine_id, f"acct-{machine_id}")))
    stack.wait_states({machine_id: "completed"})

    env = {k: v for k, v in stack.env("cli").items() if k != "SMW_METRICS_PORT"}
    outputs = []
    for args in (
        ("schema", "apply"),
        ("machines", "list"),
        ("machines", "show", machine_id, "--type", "daemon_saga"),
        ("locks", "list"),
        ("worker", "--check"),
    ):
        done = subprocess.run(
            [str(SMW), *args], env=env, capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        outputs.append(done.stdout + done.stderr)
    masked = make_url(user).render_as_string(hide_password=True)
    assert any(masked in out for out in outputs), "the masked URL is what the CLI shows"

    wrong = user.replace(quote(PASSWORD, safe=""), quote(PASSWORD[::-1], safe=""))
    refused = subprocess.run(
        [str(SMW), "machines", "list"],
        env={**env, "SMW_DATABASE_URL": wrong},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode == 1
    assert "Access denied" in refused.stderr
    outputs.append(refused.stdout + refused.stderr)

    assert worker.stop() == 0
    log = worker.log_path.read_text(encoding="utf-8")
    started = next(e for e in worker.log_events() if e["event"] == "worker.started")
    assert started["database"] == masked
    for text in [*outputs, log]:
        assert leaks(text) == [], text[-2000:]
