"""Every example in README.md runs as written (or is listed here with why it cannot).

The tutorial's Python and shell blocks run in a temporary directory with the installed `smw`;
the Kafka part runs against the test services with its own database and topics. The JSON
example is decoded as a command, and the SQL grants run against the test server.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.acceptance.test_cli import base_env, create_topics, free_port
from tests.conftest import ROOT
from worker.messages import CommandName, decode_command

pytestmark = pytest.mark.acceptance

BIN = str(Path(sys.executable).parent)
BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.DOTALL)
NOT_RUN = {
    "quick start: make test": "it is the command that runs this test",
    "own services": "it names hosts that exist only in the reader's network",
    "development": "make test, bench and chaos are the suites themselves",
}


def readme_blocks() -> list[tuple[str, str]]:
    return BLOCK.findall((ROOT / "README.md").read_text(encoding="utf-8"))


def classify(lang: str, body: str) -> str:
    if lang == "python":
        return "tutorial module"
    if lang == "json":
        return "command example"
    if lang == "sql":
        return "grants"
    if body.startswith("make demo"):
        return "quick start"
    if "SMW_SKIP_SERVICES=1" in body:
        return "own services"
    if body.startswith("make lint"):
        return "development"
    if "smw worker" in body:
        return "tutorial kafka"
    if "smw schema apply" in body:
        return "tutorial create"
    if "smw machines" in body:
        return "tutorial inspect"
    if "docker" in body:
        return "docker"
    return f"unknown {lang} block: {body[:40]!r}"


def bash(script: str, cwd: Path, env: dict[str, str]) -> str:
    """Run a block; output goes through files so a background job cannot hold a pipe open."""
    logs = Path(tempfile.mkdtemp(prefix="readme-"))
    out, err = logs / "stdout", logs / "stderr"
    with out.open("w") as stdout, err.open("w") as stderr:
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=cwd,
            env={**env, "PATH": f"{BIN}:{env.get('PATH', '')}"},
            stdout=stdout,
            stderr=stderr,
            timeout=120,
            check=False,
        )
    printed = out.read_text(encoding="utf-8")
    assert done.returncode == 0, f"{script}\n{printed}\n{err.read_text(encoding='utf-8')}"
    return printed


def test_the_readme_has_exactly_the_blocks_this_test_knows() -> None:
    kinds = [classify(lang, body) for lang, body in readme_blocks()]
    assert kinds == [
        "quick start",
        "own services",
        "tutorial module",
        "tutorial create",
        "tutorial inspect",
        "tutorial kafka",
        "command example",
        "grants",
        "development",
    ]


def test_quick_start_has_the_two_commands_and_make_demo_runs() -> None:
    (body,) = [b for lang, b in readme_blocks() if classify(lang, b) == "quick start"]
    assert [line.split("#")[0].strip() for line in body.strip().splitlines()] == [
        "make demo",
        "make test",
    ]
    out = bash("make demo", ROOT, base_env())
    assert "reached their expected state" in out


def test_tutorial_runs_as_written_on_the_embedded_default(tmp_path: Path) -> None:
    blocks = {classify(lang, body): body for lang, body in readme_blocks()}
    (tmp_path / "payouts.py").write_text(blocks["tutorial module"], encoding="utf-8")
    bash(blocks["tutorial create"], tmp_path, base_env())
    env = {**base_env(), "SMW_HANDLERS": "payouts", "SMW_DATABASE_URL": "sqlite:///tutorial.db"}
    env["PYTHONPATH"] = "."
    listing = bash(blocks["tutorial inspect"], tmp_path, env)
    rows = {line.split()[1]: line.split()[3] for line in listing.splitlines()[1:3]}
    assert rows == {"payout-1": "completed", "payout-2": "rollback_completed"}
    assert "step_compensated    rollback → rollback_completed" in listing


def test_tutorial_kafka_part_runs_against_real_services(
    tmp_path: Path, fresh_mysql_url: str, kafka: str
) -> None:
    blocks = {classify(lang, body): body for lang, body in readme_blocks()}
    (tmp_path / "payouts.py").write_text(blocks["tutorial module"], encoding="utf-8")
    script = blocks["tutorial kafka"]
    assert "mysql+mysqldb://root@127.0.0.1:3306/smw " in script
    script = script.replace("mysql+mysqldb://root@127.0.0.1:3306/smw ", f"{fresh_mysql_url} ")
    script = script.replace("127.0.0.1:9092", kafka)
    suffix = uuid.uuid4().hex[:8]
    topics = {
        "SMW_COMMAND_TOPIC": f"readme.{suffix}.commands",
        "SMW_EVENT_TOPIC": f"readme.{suffix}.events",
        "SMW_DLQ_TOPIC": f"readme.{suffix}.dlq",
    }
    create_topics(kafka, list(topics.values()))
    env = {
        **base_env(),
        **topics,
        "SMW_HANDLERS": "payouts",
        "PYTHONPATH": ".",
        "SMW_GROUP_ID": f"readme-{suffix}",
        "SMW_METRICS_PORT": str(free_port()),
        "SMW_LOG_FORMAT": "json",
    }
    worker_pid = tmp_path / "worker.pid"
    bash(f"{script}\necho $! > {worker_pid}", tmp_path, env)
    try:
        deadline = time.monotonic() + 60
        state = ""
        while time.monotonic() < deadline and state != "completed":
            listing = subprocess.run(
                [
                    f"{BIN}/smw",
                    "machines",
                    "list",
                    "--type",
                    "payout",
                    "--key",
                    "acct-7",
                    "--format",
                    "json",
                    "--database-url",
                    fresh_mysql_url,
                ],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                check=True,
                timeout=60,
            )
            found = json.loads(listing.stdout)
            state = found[0]["state"] if found else ""
            time.sleep(0.5)
        assert state == "completed"
    finally:
        os.kill(int(worker_pid.read_text(encoding="utf-8")), 15)


def test_the_command_example_is_a_valid_start_command() -> None:
    (body,) = [b for lang, b in readme_blocks() if lang == "json"]
    command = decode_command(body.encode())
    assert (command.command, command.machine_type, command.lookup_key, command.data) == (
        CommandName.START,
        "order_saga",
        "acct-42",
        {"amount": 30},
    )


def test_the_least_privilege_grants_run_on_the_test_server(fresh_mysql_url: str) -> None:
    (body,) = [b for lang, b in readme_blocks() if lang == "sql"]
    suffix = uuid.uuid4().hex[:6]
    statements = [
        s.strip().replace("'...'", "'readme-test'").replace("smw_", f"smw_{suffix}_")
        for s in body.split(";")
        if s.strip()
    ]
    engine = create_engine(fresh_mysql_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            for statement in statements:
                conn.execute(text(statement))
            grants = conn.execute(text(f"SHOW GRANTS FOR 'smw_{suffix}_worker'@'%'")).all()
            assert "SELECT, INSERT, UPDATE, DELETE ON `smw`.*" in str(grants)
    finally:
        with engine.connect() as conn:
            for user in ("worker", "migrate"):
                conn.execute(text(f"DROP USER IF EXISTS 'smw_{suffix}_{user}'@'%'"))
        engine.dispose()
    assert set(NOT_RUN) == {"quick start: make test", "own services", "development"}
