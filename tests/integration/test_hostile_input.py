"""Hostile input on the command topic: a running `smw worker` dead-letters it and changes nothing.

A property test feeds one worker process arbitrary bytes, deep and huge JSON, wrong types,
unknown commands, and ids, keys, type names and data full of quotes, backticks, semicolons,
NULs, unicode and 10 KB strings. Some of it reaches the database (a hostile id looked up, a
hostile lookup key and data inserted for a machine id that exists, a command refused for the
machine's state) and must be rolled back there. After each message:

- it is on the dead-letter topic, found by its unique Kafka key, with its bytes unchanged,
  an `smw.reason` header naming an expected refusal (never `internal_error`) and the
  original topic, partition and offset;
- the worker process is still alive;
- no row of any table changed (CHECKSUM TABLE over every table, and the row counts).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.chaos.harness import read_topic
from tests.integration.daemon_helpers import SAGA, Stack, headers_of, http_get, start, wait_for
from worker.decisions import check_request
from worker.errors import CommandRejectedError
from worker.messages import MAX_COMMAND_BYTES
from worker.states import State

pytestmark = pytest.mark.integration

EXAMPLES = 80
REFUSALS = frozenset(
    {
        "empty",
        "oversized",
        "malformed_json",
        "schema_violation",
        "unknown_machine_type",
        "unknown_machine",
        "duplicate_machine",
        "invalid_for_state",
        "request_pending",
    }
)
"""What a hostile message may be refused as; `internal_error` would mean a worker bug."""
NOT_START = ["pause", "resume", "cancel", "rollback", "retry"]
COMMANDS = {"start", *NOT_START, "override"}
SPECIAL = [
    "'",
    '"',
    "`",
    ";",
    "--",
    "/*",
    "*/",
    "\\",
    "%",
    "_",
    "\x00",
    "\n",
    "\t",
    "é",
    "ß",
    "中文",
    "😀",
    "\u202e",
    "\ufeff",
    "\u0301",
    " OR 1=1",
    "'; DROP TABLE GLOBAL_LOCK; --",
    "`; DROP TABLE `PROCESSED_COMMAND`; --",
    '"); DELETE FROM STATE_MACHINE_HISTORY; --',
    "${jndi:ldap://x/a}",
    "<script>",
    "STATE_MACHINE_DAEMON_SAGA",
]

hostile_text = st.one_of(
    st.text(min_size=1, max_size=40),
    st.lists(st.sampled_from(SPECIAL), min_size=1, max_size=8).map("".join),
    st.builds(
        lambda piece, size: (piece * (size // len(piece) + 1))[:size],
        st.sampled_from([*SPECIAL, "x"]),
        st.integers(5_000, 10_240),
    ),
)
"""Quotes, backticks, semicolons, NULs, unicode, SQL-looking text, and 10 KB strings."""

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | hostile_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(hostile_text, children),
    max_leaves=12,
)
wrong_for_string = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.just([]), st.just({})
)


def _command_id() -> st.SearchStrategy[str]:
    return st.one_of(st.builds(lambda: f"h-{uuid.uuid4().hex}"), hostile_text)


def hostile_messages(existing: str) -> st.SearchStrategy[bytes]:
    """Messages no worker may apply; `existing` is a completed machine's id."""

    def encoded(payload: Any, ascii_only: bool) -> bytes:
        return json.dumps(payload, ensure_ascii=ascii_only).encode("utf-8")

    def deep(depth: int, opener: str) -> bytes:
        if opener == "[":
            return b"[" * depth + b"]" * depth
        return b'{"a":' * depth + b"1" + b"}" * depth

    def huge(size: int) -> bytes:
        return encoded(
            {"command_id": "huge", "command": "start", "machine_type": SAGA, "pad": "x" * size},
            ascii_only=True,
        )

    def with_wrong_type(field: str, value: Any) -> dict[str, Any]:
        payload = start(f"new-{uuid.uuid4().hex}", "k")
        payload[field] = value
        return payload

    shapes: list[st.SearchStrategy[Any]] = [
        # arbitrary bytes, including none at all and invalid UTF-8
        st.binary(max_size=4096),
        # JSON nested far deeper than the 64 levels allowed
        st.builds(deep, st.integers(65, 20_000), st.sampled_from(["[", "{"])),
        # JSON over the 1 MiB limit
        st.builds(huge, st.integers(MAX_COMMAND_BYTES, MAX_COMMAND_BYTES + 200_000)),
        # JSON that is not an object, or an object of the wrong shape
        json_values,
        # wrong types for each field
        st.builds(
            with_wrong_type,
            st.sampled_from(["command_id", "command", "machine_type", "machine_id", "lookup_key"]),
            wrong_for_string,
        ),
        st.builds(
            with_wrong_type,
            st.just("data"),
            st.one_of(st.none(), st.integers(), st.text(), st.lists(st.integers())),
        ),
        # unknown commands
        st.builds(
            lambda name, cid: {
                "command_id": cid,
                "command": name,
                "machine_type": SAGA,
                "machine_id": existing,
            },
            st.one_of(
                st.sampled_from(["explode", "START", "Start", "start;", "stop"]), hostile_text
            ).filter(lambda name: name not in COMMANDS),
            _command_id(),
        ),
        # hostile type names on a start that would otherwise create a machine
        st.builds(
            lambda name, cid: {
                "command_id": cid,
                "command": "start",
                "machine_type": name,
                "machine_id": f"new-{uuid.uuid4().hex}",
                "lookup_key": "k",
            },
            st.one_of(hostile_text, st.from_regex(r"[a-z][a-z0-9_]{0,47}", fullmatch=True)).filter(
                lambda name: name != SAGA
            ),
            _command_id(),
        ),
        # hostile machine ids: looked up, never found
        st.builds(
            lambda name, machine_id, cid: {
                "command_id": cid,
                "command": name,
                "machine_type": SAGA,
                "machine_id": machine_id,
            },
            st.sampled_from(NOT_START),
            hostile_text.filter(lambda machine_id: machine_id != existing),
            _command_id(),
        ),
        # hostile command ids, actors and reasons for a machine whose state refuses them
        st.builds(
            lambda name, cid: {
                "command_id": cid,
                "command": name,
                "machine_type": SAGA,
                "machine_id": existing,
            },
            st.sampled_from(NOT_START),
            _command_id(),
        ),
        st.builds(
            lambda actor, reason, target, cid: {
                "command_id": cid,
                "command": "override",
                "machine_type": SAGA,
                "machine_id": existing,
                "actor": actor,
                "reason": reason,
                "target_state": target,
            },
            hostile_text,
            hostile_text,
            st.sampled_from([s.value for s in State]),
            _command_id(),
        ),
        # hostile lookup keys and data, inserted for an id that exists: rolled back
        st.builds(
            lambda key, data, cid: {
                "command_id": cid,
                "command": "start",
                "machine_type": SAGA,
                "machine_id": existing,
                "lookup_key": key,
                "data": data,
            },
            hostile_text,
            st.dictionaries(hostile_text, json_values, max_size=6),
            _command_id(),
        ),
    ]
    return st.one_of(
        st.one_of(shapes[:3]),
        st.builds(encoded, st.one_of(shapes[3:]), st.booleans()),
    )


class DeadLetters:
    """Reads the dead-letter topic from the beginning, keeping every message by its key."""

    def __init__(self, stack: Stack) -> None:
        self.consumer = Consumer(
            {
                "bootstrap.servers": stack.kafka,
                "group.id": f"smw-test-hostile-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "fetch.message.max.bytes": 4 * 1024 * 1024,
            }
        )
        self.consumer.assign([TopicPartition(stack.dlq_topic, 0, OFFSET_BEGINNING)])
        self.by_key: dict[bytes, Any] = {}

    def wait(self, key: bytes, timeout: float = 60.0) -> Any:
        deadline = time.monotonic() + timeout
        while key not in self.by_key:
            if time.monotonic() > deadline:
                pytest.fail(f"{key!r} never reached the dead-letter topic")
            message = self.consumer.poll(0.2)
            if message is None:
                continue
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    continue
                raise KafkaException(error)
            self.by_key[message.key() or b""] = message
        return self.by_key[key]

    def close(self) -> None:
        self.consumer.close()


def snapshot(stack: Stack) -> dict[str, tuple[int, int]]:
    """Each table's (row count, CHECKSUM TABLE)."""
    with stack.db.connect() as conn:
        names = [row[0] for row in conn.execute(sa.text("SHOW TABLES"))]
        found = {}
        for name in names:
            quoted = conn.dialect.identifier_preparer.quote(name)
            count = conn.execute(sa.text(f"SELECT COUNT(*) FROM {quoted}")).scalar_one()
            checksum = conn.execute(sa.text(f"CHECKSUM TABLE {quoted}")).one()[1]
            found[name] = (int(count), int(checksum or 0))
    return found


@pytest.fixture
def stack(fresh_mysql_url: str, kafka: str, tmp_path: Path) -> Iterator[Stack]:
    stack = Stack(fresh_mysql_url, kafka, tmp_path)
    try:
        yield stack
    finally:
        stack.close()


@pytest.mark.timeout(600)
def test_hostile_messages_are_dead_lettered_and_change_no_row(stack: Stack) -> None:
    worker = stack.spawn("w1")
    existing = f"done-{stack.suffix}"
    stack.send((f"acct-{existing}", start(existing, f"acct-{existing}")))
    stack.wait_states({existing: "completed"})
    for name in NOT_START:  # so every command the test sends for it is refused
        with pytest.raises(CommandRejectedError):
            check_request(State.COMPLETED, name)

    def quiet() -> dict[str, tuple[int, int]] | None:
        with stack.db.connect() as conn:
            unpublished = conn.execute(
                sa.text("SELECT COUNT(*) FROM EVENT_OUTBOX WHERE PublishedTimestamp IS NULL")
            ).scalar_one()
        return snapshot(stack) if unpublished == 0 else None

    before = wait_for("the outbox to be published", quiet)
    dead_letters = DeadLetters(stack)
    fed: list[str] = []

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(value=hostile_messages(existing))
    def feed(value: bytes) -> None:
        key = f"hostile-{uuid.uuid4().hex}"
        (sent,) = stack.send((key, value))
        found = dead_letters.wait(key.encode())
        headers = headers_of(found)
        assert headers["smw.reason"] in REFUSALS, (headers, value[:300])
        assert headers["smw.original.topic"] == stack.command_topic
        assert (headers["smw.original.partition"], headers["smw.original.offset"]) == (
            str(sent.partition),
            str(sent.offset),
        )
        if "smw.value.omitted" not in headers:
            assert (found.value() or b"") == value
        assert worker.alive, worker.log_path.read_text(encoding="utf-8")[-3000:]
        assert snapshot(stack) == before, f"a row changed after {value[:300]!r}"
        fed.append(headers["smw.reason"])

    try:
        feed()
    finally:
        dead_letters.close()
    assert worker.alive
    assert http_get(worker.metrics_port, "/healthz")[0] == 200
    assert stack.states() == {existing: "completed"}
    print(f"\nhostile input: {len(fed)} messages dead-lettered: {sorted(set(fed))}")
    assert worker.stop() == 0


@pytest.mark.timeout(120)
def test_ids_that_differ_only_by_case_or_accent_are_different_machines_and_commands(
    stack: Stack,
) -> None:
    """Id columns compare bytes (utf8mb4_bin), not the database's case-insensitive default."""
    worker = stack.spawn("w1")
    machine_ids = [f"case-{stack.suffix}", f"CASE-{stack.suffix}", f"c\u00e4se-{stack.suffix}"]
    commands = [start(m, f"acct-{m}") for m in machine_ids]
    other = f"other-{stack.suffix}"
    commands.append({**start(other, f"acct-{other}"), "command_id": f"START-{machine_ids[0]}"})
    commands[0]["command_id"] = f"start-{machine_ids[0]}"
    stack.send(*[(c["lookup_key"], c) for c in commands])
    everyone = [*machine_ids, other]

    def settled() -> bool:
        states = stack.states(everyone)
        dead = read_topic(stack.kafka, stack.dlq_topic, timeout=10)
        done = sum(state == "completed" for state in states.values())
        return done + len(dead) >= len(everyone)

    wait_for("every command to be applied or dead-lettered", settled, 60)
    assert stack.states(everyone) == dict.fromkeys(everyone, "completed")
    assert worker.stop() == 0
