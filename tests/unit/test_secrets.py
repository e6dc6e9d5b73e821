"""Secrets never reach logs or error output: database passwords, SASL and OAuth secrets.

Every `smw` command that touches the database or Kafka runs as a subprocess with a database
URL that carries a distinctive password (and, in a second variant, the password from
SMW_DATABASE_PASSWORD or SMW_DATABASE_PASSWORD_FILE), with librdkafka settings that carry a
SASL password, an OAuth client secret and a key passphrase, against a database and a broker
that do not answer. Whatever each command prints, on stdout or stderr, in JSON or console
logs at debug level, holds none of the secrets. A worker that does start (on SQLite) logs
`worker.started` with its Kafka settings masked, including librdkafka's own debug output.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from worker.config import Settings, parse_kafka_config, redact_config, redact_url
from worker.errors import WorkerError
from worker.logs import scrub

pytestmark = pytest.mark.unit

SMW = str(Path(sys.executable).with_name("smw"))
REPO = Path(__file__).resolve().parents[2]

DSN_PASSWORD = "dsnQ7fZk:w@Xp9Lv/Rr%Tq2"  # noqa: S105  # fake; every character a URL escapes
ENV_PASSWORD = "envPw41b8e2dA"  # noqa: S105
FILE_PASSWORD = "filePwC0ffee5B"  # noqa: S105
SASL_PASSWORD = "saslPw9d2e71aC"  # noqa: S105
OAUTH_SECRET = "oauthSecret5be11D"  # noqa: S105
OAUTH_CONFIG_SECRET = "oauthCfgSecret3c4E"  # noqa: S105
PASSPHRASE = "keyPassphrase77aaF"  # noqa: S105
SECRETS = [
    DSN_PASSWORD,
    quote(DSN_PASSWORD, safe=""),
    ENV_PASSWORD,
    FILE_PASSWORD,
    SASL_PASSWORD,
    OAUTH_SECRET,
    OAUTH_CONFIG_SECRET,
    PASSPHRASE,
]
FRAGMENTS = [part for part in re.split(r"[^A-Za-z0-9]", DSN_PASSWORD) if len(part) >= 4]
"""A scrubber that stops at the first special character would leak the rest."""

KAFKA_CONFIG = ",".join(
    [
        "security.protocol=SASL_PLAINTEXT",
        "sasl.mechanism=PLAIN",
        "sasl.username=smw",
        f"sasl.password={SASL_PASSWORD}",
        f"sasl.oauthbearer.client.secret={OAUTH_SECRET}",
        f"sasl.oauthbearer.config=principal=smw clientSecret={OAUTH_CONFIG_SECRET}",
        f"sasl.oauthbearer.assertion.private.key.passphrase={PASSPHRASE}",
        "message.timeout.ms=3000",
    ]
)
UNREACHABLE_DSN = f"mysql+mysqldb://smw:{quote(DSN_PASSWORD, safe='')}@127.0.0.1:1/smw"


def leaked(text: str) -> list[str]:
    return [s for s in [*SECRETS, *FRAGMENTS] if s in text]


def base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SMW_")}


@dataclass(frozen=True)
class Variant:
    name: str
    log_format: str
    password_env: bool

    def env(self, directory: Path) -> dict[str, str]:
        env = {
            **base_env(),
            "PYTHONPATH": str(REPO),
            "SMW_KAFKA_BOOTSTRAP": "127.0.0.1:1",
            "SMW_KAFKA_CONFIG": KAFKA_CONFIG,
            "SMW_LOG_FORMAT": self.log_format,
            "SMW_LOG_LEVEL": "debug",
            "SMW_METRICS_PORT": "0",
        }
        if self.password_env:
            env["SMW_DATABASE_URL"] = UNREACHABLE_DSN
            env["SMW_DATABASE_PASSWORD"] = ENV_PASSWORD
        else:
            password_file = directory / "db-password"
            password_file.write_text(FILE_PASSWORD + "\n", encoding="utf-8")
            env["SMW_DATABASE_URL"] = "mysql+mysqldb://smw@127.0.0.1:1/smw"
            env["SMW_DATABASE_PASSWORD_FILE"] = str(password_file)
        return env


VARIANTS = [
    Variant("dsn+env-password/json", "json", password_env=True),
    Variant("password-file/console", "console", password_env=False),
]
COMMANDS: list[tuple[str, ...]] = [
    ("worker", "--check"),
    ("worker",),
    ("worker", "--help"),
    ("schema", "apply"),
    ("machines", "list"),
    ("machines", "show", "m-1", "--type", "order_saga"),
    ("locks", "list"),
    ("send", "start", "--type", "order_saga", "--key", "acct-1", "--data", '{"amount": 1}'),
    ("send", "cancel", "--type", "order_saga", "--id", "m-1"),
]


@dataclass(frozen=True)
class Ran:
    code: int
    stdout: str
    stderr: str


def run_smw(args: tuple[str, ...], env: dict[str, str]) -> Ran:
    done = subprocess.run(
        [SMW, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    return Ran(done.returncode, done.stdout, done.stderr)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Ran]:
    """Every command under every variant, run a few at a time."""
    directory = tmp_path_factory.mktemp("secrets")
    jobs = [(v, c) for v in VARIANTS for c in COMMANDS]
    with ThreadPoolExecutor(max_workers=4) as pool:
        done = pool.map(lambda job: run_smw(job[1], job[0].env(directory)), jobs)
        return {(v.name, " ".join(c)): ran for (v, c), ran in zip(jobs, done, strict=True)}


@pytest.mark.parametrize("variant", [v.name for v in VARIANTS])
@pytest.mark.parametrize("command", [" ".join(c) for c in COMMANDS])
def test_no_command_shows_a_secret_on_stdout_or_stderr(
    results: dict[tuple[str, str], Ran], variant: str, command: str
) -> None:
    ran = results[(variant, command)]
    assert leaked(ran.stdout) == [], ran.stdout[-2000:]
    assert leaked(ran.stderr) == [], ran.stderr[-2000:]
    if command == "worker --help":
        assert ran.code == 0
        return
    # The database and the broker do not answer, so every other command fails, and says so.
    assert ran.code == 1, f"{ran.stdout}\n{ran.stderr}"
    assert ran.stdout + ran.stderr
    if "--check" in command:
        assert ran.stdout.startswith("database FAILED: mysql+mysqldb://smw")
    if command.startswith("send start"):
        assert "not acknowledged by topic" in ran.stderr


def test_a_running_worker_logs_its_settings_with_every_secret_masked(tmp_path: Path) -> None:
    """On SQLite the worker starts; librdkafka's own config dump (debug=conf) is on too."""
    env = {
        **base_env(),
        "PYTHONPATH": str(REPO),
        "SMW_DATABASE_URL": f"sqlite:///{tmp_path / 'smw.db'}",
        "SMW_DATABASE_PASSWORD": ENV_PASSWORD,
        "SMW_KAFKA_BOOTSTRAP": "127.0.0.1:1",
        "SMW_KAFKA_CONFIG": f"{KAFKA_CONFIG},debug=conf",
        "SMW_LOG_FORMAT": "json",
        "SMW_LOG_LEVEL": "debug",
        "SMW_METRICS_PORT": "0",
        "SMW_WORKER_ID": "secrets-test",
    }
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [SMW, "worker"], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        started = _wait_for_line(log_path, '"worker.started"', process)
        time.sleep(2.0)  # librdkafka logs its connection attempts meanwhile
        process.send_signal(signal.SIGTERM)
        assert process.wait(90) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
    output = log_path.read_text(encoding="utf-8", errors="replace")
    assert leaked(output) == []
    event = json.loads(started)
    assert event["database"] == f"sqlite:///{tmp_path / 'smw.db'}"
    kafka = event["kafka"]
    for key in (
        "sasl.password",
        "sasl.oauthbearer.client.secret",
        "sasl.oauthbearer.config",
        "sasl.oauthbearer.assertion.private.key.passphrase",
    ):
        assert kafka[key] == "***", key
    assert kafka["sasl.username"] == "smw"
    assert kafka["bootstrap.servers"] == "127.0.0.1:1"
    assert '"worker.stopped"' in output
    assert "CONF" in output, "librdkafka's debug=conf dump was expected in the log"


def _wait_for_line(path: Path, marker: str, process: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if marker in line:
                return line
        assert process.poll() is None, path.read_text(encoding="utf-8", errors="replace")
        time.sleep(0.1)
    pytest.fail(f"no {marker} in the worker's log within 60s")


# -- in-process ---------------------------------------------------------------------------


def test_settings_repr_never_shows_a_password() -> None:
    settings = Settings(
        database_url=UNREACHABLE_DSN,
        database_password=ENV_PASSWORD,
        kafka_config=parse_kafka_config(KAFKA_CONFIG, None),
    )
    assert leaked(repr(settings)) == []
    assert leaked(str(settings)) == []
    assert leaked(settings.safe_database_url) == []
    assert settings.safe_database_url == "mysql+mysqldb://smw:***@127.0.0.1:1/smw"


@pytest.mark.parametrize(
    "key",
    [
        "sasl.password",
        "sasl.jaas.config",
        "sasl.oauthbearer.config",
        "sasl.oauthbearer.client.secret",
        "sasl.oauthbearer.client.credentials.client.secret",
        "sasl.oauthbearer.assertion.private.key.passphrase",
        "sasl.oauthbearer.assertion.private.key.pem",
        "ssl.key.password",
        "ssl.key.pem",
        "ssl.keystore.password",
    ],
)
def test_every_secret_librdkafka_setting_is_masked(key: str) -> None:
    assert redact_config({key: "hush", "bootstrap.servers": "b:9092"}) == {
        key: "***",
        "bootstrap.servers": "b:9092",
    }


@pytest.mark.parametrize(
    "text",
    [
        f"connect to {UNREACHABLE_DSN} failed",
        f"mysql+mysqldb://smw:{ENV_PASSWORD}@db:3306/smw",
        f"url=mysql://root:{SASL_PASSWORD}@h/x,other",
    ],
)
def test_scrub_masks_the_password_of_any_url_in_a_text(text: str) -> None:
    assert leaked(scrub(text)) == []
    assert ":***@" in scrub(text)


def test_redact_url_masks_a_password_with_url_escapes() -> None:
    assert redact_url(UNREACHABLE_DSN) == "mysql+mysqldb://smw:***@127.0.0.1:1/smw"


@pytest.mark.parametrize(
    "pairs",
    [
        f"sasl.password={SASL_PASSWORD[:5]},{SASL_PASSWORD[5:]}",
        f"{SASL_PASSWORD}",
        f"security.protocol=SSL,{SASL_PASSWORD}",
    ],
)
def test_a_malformed_kafka_setting_is_refused_without_echoing_it(pairs: str) -> None:
    with pytest.raises(WorkerError) as raised:
        parse_kafka_config(pairs, None)
    message = str(raised.value)
    assert SASL_PASSWORD[5:] not in message
    assert "SMW_KAFKA_CONFIG" in message


def test_a_malformed_line_in_a_kafka_properties_file_is_not_echoed(tmp_path: Path) -> None:
    path = tmp_path / "kafka.properties"
    path.write_text(f"sasl.mechanism=PLAIN\n{SASL_PASSWORD}\n", encoding="utf-8")
    with pytest.raises(WorkerError) as raised:
        parse_kafka_config(None, str(path))
    assert SASL_PASSWORD not in str(raised.value)
    assert str(path) in str(raised.value)
