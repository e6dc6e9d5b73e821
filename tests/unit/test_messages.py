"""Command decoding, event validation and dead-letter headers against the wire contract."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from worker.errors import CommandRejectedError
from worker.messages import (
    MAX_COMMAND_BYTES,
    MAX_JSON_DEPTH,
    REASON_CODES,
    SCHEMA_DIR,
    Command,
    CommandName,
    dead_letter_headers,
    decode_command,
    load_schema,
    validate_event,
)
from worker.states import State

pytestmark = pytest.mark.unit

TYPE_PATTERN = "^[a-z][a-z0-9_]{0,47}$"
TYPE_NAME = re.compile(TYPE_PATTERN)
STATES = [state.value for state in State]
UTC_TIMESTAMP = "an RFC 3339 UTC timestamp ending in Z"
ADVICE = "; fix the producer to follow schema/command.schema.json"
FUZZ = settings(max_examples=300, deadline=None)


def encode(payload: object) -> bytes:
    return json.dumps(payload).encode("utf-8")


def rejection(raw: bytes | None, **kwargs: Any) -> CommandRejectedError:
    with pytest.raises(CommandRejectedError) as caught:
        decode_command(raw, **kwargs)
    return caught.value


def nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


START = {"command_id": "c-1", "command": "start", "machine_type": "order", "lookup_key": "acct-7"}
PAUSE = {"command_id": "c-2", "command": "pause", "machine_type": "order", "machine_id": "m-1"}
OVERRIDE = {
    "command_id": "c-3",
    "command": "override",
    "machine_type": "order",
    "machine_id": "m-1",
    "actor": "ops",
    "reason": "stuck after outage",
    "target_state": "failed",
}


def test_schemas_are_valid_draft_2020_12_and_reached_through_the_package_link() -> None:
    assert SCHEMA_DIR.resolve() == (Path(__file__).parents[2] / "schema").resolve()
    for name in ("command", "event"):
        Draft202012Validator.check_schema(load_schema(name))


def test_schema_enums_match_the_code() -> None:
    command = load_schema("command")
    event = load_schema("event")
    assert command["properties"]["command"]["enum"] == [name.value for name in CommandName]
    assert command["$defs"]["state"]["enum"] == STATES
    assert event["$defs"]["state"]["enum"] == STATES


def test_minimal_start_is_accepted() -> None:
    assert decode_command(encode(START)) == Command(
        command_id="c-1", command=CommandName.START, machine_type="order", lookup_key="acct-7"
    )


def test_start_with_machine_id_and_data_is_accepted() -> None:
    payload = {**START, "machine_id": "m-9", "data": {"amount": 12.5, "items": [1, 2]}}
    assert decode_command(encode(payload)) == Command(
        command_id="c-1",
        command=CommandName.START,
        machine_type="order",
        machine_id="m-9",
        lookup_key="acct-7",
        data={"amount": 12.5, "items": [1, 2]},
    )


@pytest.mark.parametrize("name", ["pause", "resume", "cancel", "rollback", "retry"])
def test_machine_commands_are_accepted_with_a_machine_id(name: str) -> None:
    payload = {**PAUSE, "command": name, "lookup_key": "acct-7", "actor": "ops", "reason": "x"}
    assert decode_command(encode(payload)) == Command(
        command_id="c-2",
        command=CommandName(name),
        machine_type="order",
        machine_id="m-1",
        lookup_key="acct-7",
        actor="ops",
        reason="x",
    )


def test_override_is_accepted_with_actor_reason_and_target_state() -> None:
    assert decode_command(encode(OVERRIDE)) == Command(
        command_id="c-3",
        command=CommandName.OVERRIDE,
        machine_type="order",
        machine_id="m-1",
        actor="ops",
        reason="stuck after outage",
        target_state="failed",
    )


def test_unknown_fields_are_ignored() -> None:
    payload = {**PAUSE, "trace": {"id": "abc"}, "version": 2}
    assert decode_command(encode(payload)) == decode_command(encode(PAUSE))


def test_fields_at_their_maximum_lengths_are_accepted() -> None:
    payload = {
        **START,
        "command_id": "c" * 128,
        "machine_type": "a" + "b" * 47,
        "machine_id": "m" * 128,
        "lookup_key": "k" * 191,
    }
    command = decode_command(encode(payload))
    assert (len(command.command_id), len(command.machine_type)) == (128, 48)
    assert (len(command.machine_id or ""), len(command.lookup_key or "")) == (128, 191)


def test_json_nested_exactly_to_the_limit_is_accepted() -> None:
    payload = {**START, "data": {"x": nested(MAX_JSON_DEPTH - 2)}}
    assert decode_command(encode(payload)).data == {"x": nested(MAX_JSON_DEPTH - 2)}


def test_a_message_exactly_at_the_size_limit_is_accepted() -> None:
    raw = encode(START)
    assert decode_command(raw, max_bytes=len(raw)).command_id == "c-1"


def test_to_json_is_compact_utf8_without_unset_fields() -> None:
    command = Command(
        command_id="c-é", command=CommandName.START, machine_type="order", lookup_key="k"
    )
    assert (
        command.to_json()
        == (
            '{"command_id":"c-é","command":"start","machine_type":"order","lookup_key":"k"}'
        ).encode()
    )


@pytest.mark.parametrize(
    "command",
    [
        Command("c-1", CommandName.START, "order", lookup_key="k"),
        Command("c-1", CommandName.START, "order", "m-1", "k", {"a": [1, {"b": None}]}),
        Command("c-2", CommandName.RETRY, "order", machine_id="m-1"),
        Command("c-3", CommandName.OVERRIDE, "order", "m", None, None, "ops", "why", "paused"),
        Command("'; DROP TABLE x; --", CommandName.CANCEL, "o", machine_id='"`;\\😀'),
    ],
)
def test_to_json_round_trips_through_decode_command(command: Command) -> None:
    assert decode_command(command.to_json()) == command


@pytest.mark.parametrize("raw", [None, b""])
def test_no_value_is_rejected_as_empty(raw: bytes | None) -> None:
    error = rejection(raw)
    assert (error.reason_code, str(error)) == (
        "empty",
        "command rejected: the message has no value; expected a UTF-8 JSON object" + ADVICE,
    )


def test_oversized_is_rejected_before_parsing() -> None:
    error = rejection(b"\xff" * 11, max_bytes=10)
    assert (error.reason_code, str(error)) == (
        "oversized",
        (
            "command rejected: the message is 11 bytes; expected at most 10; "
            "send large data by reference instead"
        ),
    )


def test_default_size_limit_is_one_mebibyte() -> None:
    assert rejection(b"{" * (MAX_COMMAND_BYTES + 1)).reason_code == "oversized"
    assert rejection(b"{" * MAX_COMMAND_BYTES).reason_code == "malformed_json"


def malformed(problem: str) -> str:
    return f"command rejected: {problem}; expected one UTF-8 JSON object{ADVICE}"


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"\xff{}", "the message is not UTF-8 (bad byte at offset 0)"),
        (b'{"a": 1', "the message is not JSON (Expecting ',' delimiter: line 1 column 8 (char 7))"),
        (b"   ", "the message is not JSON (Expecting value: line 1 column 4 (char 3))"),
        (
            "\ufeff{}".encode(),
            (
                "the message is not JSON (Unexpected UTF-8 BOM (decode using utf-8-sig): "
                "line 1 column 1 (char 0))"
            ),
        ),
        (b'{"a": NaN}', "the message is not valid JSON (NaN is not a JSON number)"),
        (b'{"a": -Infinity}', "the message is not valid JSON (-Infinity is not a JSON number)"),
        (b'{"a": 1e999}', "the message is not valid JSON (number 1e999 is out of range)"),
        (b"9" * 4001, "the message is not valid JSON (an integer has 4001 digits, more than 4000)"),
        (b'{"a": 1, "a": 2}', "the message is not valid JSON (duplicate key 'a')"),
        (b'{"a": "\\ud800"}', "a string holds an unpaired UTF-16 surrogate escape"),
        (encode(nested(MAX_JSON_DEPTH + 1)), "JSON nests deeper than 64 levels"),
        (b"[" * 10_000 + b"]" * 10_000, "JSON nests deeper than 64 levels"),
        (b'{"a":' * 10_000 + b"1" + b"}" * 10_000, "JSON nests deeper than 64 levels"),
    ],
)
def test_malformed_json_is_rejected(raw: bytes, problem: str) -> None:
    error = rejection(raw)
    assert (error.reason_code, str(error)) == ("malformed_json", malformed(problem))


@pytest.mark.parametrize(
    "payload",
    [
        {**START, "command_id": "a\ud800b"},
        {**START, "lookup_key": "\udfff"},
        {**START, "machine_id": "m\udc00"},
        {**START, "data": {"\ud800": 1}},
        {**START, "data": {"x": ["\udbff"]}},
    ],
)
def test_unpaired_surrogate_escapes_are_rejected_anywhere(payload: dict[str, Any]) -> None:
    error = rejection(encode(payload))
    assert (error.reason_code, str(error)) == (
        "malformed_json",
        malformed("a string holds an unpaired UTF-16 surrogate escape"),
    )


def test_paired_surrogate_escapes_decode_to_one_character() -> None:
    raw = encode({**START, "data": {"x": "\ud83d\ude00"}})
    assert b"\\ud83d\\ude00" in raw
    assert decode_command(raw).data == {"x": "\U0001f600"}


def violation(detail: str) -> str:
    return f"command rejected: {detail}{ADVICE}"


@pytest.mark.parametrize(
    ("payload", "detail"),
    [
        ([], "$: expected object, found array"),
        ("start", "$: expected object, found string"),
        ({}, "$: expected field 'command_id', found it missing"),
        (
            {**START, "command_id": ""},
            "$.command_id: expected a non-empty string, found an empty one",
        ),
        (
            {**START, "command_id": "x" * 129},
            "$.command_id: expected at most 128 characters, found 129",
        ),
        ({**START, "command_id": 7}, "$.command_id: expected string, found integer"),
        (
            {**START, "command": "stop"},
            (
                "$.command: expected one of start, pause, resume, cancel, rollback, retry, "
                "override, found 'stop'"
            ),
        ),
        (
            {**START, "machine_type": "Order"},
            f"$.machine_type: expected a string matching {TYPE_PATTERN}, found 'Order'",
        ),
        (
            {**START, "machine_type": "order\n"},
            f"$.machine_type: expected a string matching {TYPE_PATTERN}, found 'order\\n'",
        ),
        (
            {**START, "machine_type": "a" * 49},
            f"$.machine_type: expected a string matching {TYPE_PATTERN}, found {'a' * 49!r}",
        ),
        (
            {**START, "lookup_key": "k" * 192},
            "$.lookup_key: expected at most 191 characters, found 192",
        ),
        ({**START, "data": None}, "$.data: expected object, found null"),
        ({**PAUSE, "machine_id": None}, "$.machine_id: expected string, found null"),
        (
            {k: v for k, v in START.items() if k != "lookup_key"},
            "$: expected field 'lookup_key' when command is 'start', found it missing",
        ),
        (
            {k: v for k, v in PAUSE.items() if k != "machine_id"},
            "$: expected field 'machine_id' when command is 'pause', found it missing",
        ),
        (
            {**PAUSE, "data": {}},
            "$.data: expected no such field when command is 'pause', found one",
        ),
        (
            {**PAUSE, "target_state": "open"},
            "$.target_state: expected no such field when command is 'pause', found one",
        ),
        (
            {k: v for k, v in OVERRIDE.items() if k != "reason"},
            "$: expected field 'reason' when command is 'override', found it missing",
        ),
        ({**OVERRIDE, "actor": ""}, "$.actor: expected a non-empty string, found an empty one"),
        ({**OVERRIDE, "reason": "r" * 257}, "$.reason: expected at most 256 characters, found 257"),
        (
            {**OVERRIDE, "target_state": "done"},
            "$.target_state: expected one of " + ", ".join(STATES) + ", found 'done'",
        ),
    ],
)
def test_schema_violations_name_the_path_and_what_was_expected(
    payload: object, detail: str
) -> None:
    error = rejection(encode(payload))
    assert (error.reason_code, str(error)) == ("schema_violation", violation(detail))


def test_hostile_values_are_echoed_at_most_64_characters() -> None:
    hostile = "'; DROP TABLE machines; --" + "A" * 10_000
    error = rejection(encode({**START, "machine_type": hostile}))
    assert str(error) == violation(
        "$.machine_type: expected a string matching ^[a-z][a-z0-9_]{0,47}$, "
        f"found {hostile[:64]!r}..."
    )


def test_long_messages_are_cut_to_300_characters() -> None:
    error = rejection(encode({**START, "machine_type": "\x00" * 100}))
    assert error.reason_code == "schema_violation"
    assert len(str(error)) <= 300
    assert str(error).endswith("..." + ADVICE)


def test_from_dict_validates_like_decode_command() -> None:
    assert Command.from_dict(PAUSE) == decode_command(encode(PAUSE))
    with pytest.raises(CommandRejectedError) as caught:
        Command.from_dict({**PAUSE, "machine_id": ""})
    assert caught.value.reason_code == "schema_violation"


GOOD_EVENT: dict[str, Any] = {
    "event_id": "01J0000000000000000000000",
    "sequence": 3,
    "machine_type": "order",
    "machine_id": "m-1",
    "lookup_key": "acct-7",
    "from_state": "open",
    "to_state": "retry",
    "event": "retry_scheduled",
    "step": 1,
    "handler": "charge_card",
    "data": {"amount": 12},
    "error": "TimeoutError: card processor did not answer",
    "command_id": None,
    "occurred_at": "2024-05-01T12:30:00.123456Z",
}


@pytest.mark.parametrize(
    "event",
    [
        GOOD_EVENT,
        {**GOOD_EVENT, "step": None, "handler": None, "error": None, "command_id": "c-1"},
        {
            **GOOD_EVENT,
            "sequence": 0,
            "event": "command_rejected",
            "occurred_at": "2024-05-01T12:30:00Z",
        },
        {**GOOD_EVENT, "extra": [1, 2]},
    ],
)
def test_valid_events_pass(event: dict[str, Any]) -> None:
    validate_event(event)


@pytest.mark.parametrize(
    ("event", "detail"),
    [
        (
            {k: v for k, v in GOOD_EVENT.items() if k != "data"},
            "$: expected field 'data', found it missing",
        ),
        ({**GOOD_EVENT, "sequence": -1}, "$.sequence: expected a number >= 0, found -1"),
        ({**GOOD_EVENT, "sequence": "3"}, "$.sequence: expected integer, found string"),
        (
            {**GOOD_EVENT, "sequence": 0},
            "$.event: expected 'command_rejected' when sequence is 0, found 'retry_scheduled'",
        ),
        (
            {**GOOD_EVENT, "to_state": "done"},
            "$.to_state: expected one of " + ", ".join(STATES) + ", found 'done'",
        ),
        ({**GOOD_EVENT, "step": "1"}, "$.step: expected integer or null, found string"),
        (
            {**GOOD_EVENT, "occurred_at": "2024-05-01T12:30:00+00:00"},
            f"$.occurred_at: expected {UTC_TIMESTAMP}, found '2024-05-01T12:30:00+00:00'",
        ),
        (
            {**GOOD_EVENT, "occurred_at": "2024-13-01T12:30:00Z"},
            f"$.occurred_at: expected {UTC_TIMESTAMP}, found '2024-13-01T12:30:00Z'",
        ),
    ],
)
def test_invalid_events_raise_value_error_naming_the_path(
    event: dict[str, Any], detail: str
) -> None:
    with pytest.raises(ValueError, match=r"^event does not match") as caught:
        validate_event(event)
    assert str(caught.value) == f"event does not match schema/event.schema.json: {detail}"


def test_dead_letter_headers_carry_reason_and_origin() -> None:
    assert dead_letter_headers("malformed_json", "bad bytes", "statemachine.commands", 3, 42) == [
        ("smw.reason", b"malformed_json"),
        ("smw.reason.detail", b"bad bytes"),
        ("smw.original.topic", b"statemachine.commands"),
        ("smw.original.partition", b"3"),
        ("smw.original.offset", b"42"),
    ]


def test_dead_letter_detail_is_cut_to_1000_bytes_on_a_character_boundary() -> None:
    headers = dict(dead_letter_headers("schema_violation", "é" * 600, "t", 0, 0))
    assert headers["smw.reason.detail"] == ("é" * 500).encode()


HOSTILE_FRAGMENTS = [
    "'",
    '"',
    "`",
    ";",
    "\\",
    "\n",
    "\x00",
    "\u202e",
    "😀",
    "é",
    "\ud800",
    "'; DROP TABLE machines; --",
    '" OR "1"="1',
    "`rm -rf /`",
    "${env:HOME}",
    "%s%n",
    "<script>",
    "start",
    "order",
]

short_text = st.text(max_size=40)
built_text = st.lists(
    st.sampled_from(HOSTILE_FRAGMENTS) | st.text(alphabet="az_09", max_size=4), max_size=12
).map("".join)
huge_text = st.builds(
    lambda seed, size: (seed * size)[:size], short_text.filter(bool), st.integers(10_000, 10_240)
)
type_names = st.from_regex(r"[a-z][a-z0-9_]{0,47}", fullmatch=True)
near_type_names = st.builds(
    lambda name, tail: name + tail, type_names, st.sampled_from(HOSTILE_FRAGMENTS)
)
any_text = st.one_of(short_text, built_text, huge_text, type_names, near_type_names)

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | any_text
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(any_text, children, max_size=4)
    ),
    max_leaves=30,
)
field_values = st.one_of(any_text, json_scalars, json_values)

clean_text = st.lists(
    st.sampled_from([f for f in HOSTILE_FRAGMENTS if f != "\ud800"]) | st.text(max_size=4),
    max_size=12,
).map("".join)
clean_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | clean_text,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(clean_text, children, max_size=4)
    ),
    max_leaves=30,
)


def bounded(maximum: int, text: st.SearchStrategy[str] = clean_text) -> st.SearchStrategy[str]:
    return text.filter(lambda value: 0 < len(value) <= maximum)


base_text = clean_text | built_text

FIELDS = [
    "command_id",
    "command",
    "machine_type",
    "machine_id",
    "lookup_key",
    "data",
    "actor",
    "reason",
    "target_state",
]


@st.composite
def command_like(draw: st.DrawFn) -> dict[str, Any]:
    """A valid command with hostile but legal values, then a few fields broken or removed."""
    name = draw(st.sampled_from(CommandName))
    payload: dict[str, Any] = {
        "command_id": draw(bounded(128, base_text)),
        "command": name.value,
        "machine_type": draw(type_names | near_type_names),
        "machine_id": draw(bounded(128, base_text)),
        "lookup_key": draw(bounded(191, base_text)),
    }
    if name is CommandName.START:
        payload["data"] = draw(st.dictionaries(clean_text, clean_values, max_size=3))
    if name is CommandName.OVERRIDE:
        payload["actor"] = draw(bounded(256, base_text))
        payload["reason"] = draw(bounded(256, base_text))
        payload["target_state"] = draw(st.sampled_from(STATES))
    payload.update(
        draw(st.dictionaries(st.sampled_from([*FIELDS, "extra"]), field_values, max_size=2))
    )
    for removed in draw(st.sets(st.sampled_from(FIELDS), max_size=1)):
        payload.pop(removed, None)
    return payload


@st.composite
def json_bytes(draw: st.DrawFn, values: st.SearchStrategy[Any]) -> bytes:
    text = json.dumps(draw(values), ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", "surrogatepass")


def outcome(raw: bytes | None) -> Command | CommandRejectedError:
    try:
        return decode_command(raw)
    except CommandRejectedError as error:
        return error


def assert_contract_outcome(raw: bytes | None) -> None:
    """Either a command that meets the schema, or a rejection with a known reason."""
    command = outcome(raw)
    if isinstance(command, CommandRejectedError):
        assert command.reason_code in REASON_CODES
        assert len(str(command)) <= 300
        return
    assert TYPE_NAME.fullmatch(command.machine_type)
    assert 1 <= len(command.command_id) <= 128
    if command.command is CommandName.START:
        assert command.lookup_key is not None
        assert 1 <= len(command.lookup_key) <= 191
        assert command.machine_id is None or 1 <= len(command.machine_id) <= 128
    else:
        assert command.machine_id is not None
        assert 1 <= len(command.machine_id) <= 128
        assert command.data is None
    if command.command is CommandName.OVERRIDE:
        assert command.actor is not None
        assert command.reason is not None
        assert 1 <= len(command.actor) <= 256
        assert 1 <= len(command.reason) <= 256
        assert command.target_state in STATES
    else:
        assert command.target_state is None
    assert decode_command(command.to_json()) == command


@FUZZ
@given(st.binary(max_size=512) | st.none())
def test_fuzz_arbitrary_bytes(raw: bytes | None) -> None:
    assert_contract_outcome(raw)


@FUZZ
@given(json_bytes(json_values))
def test_fuzz_arbitrary_json(raw: bytes) -> None:
    assert_contract_outcome(raw)


@FUZZ
@given(json_bytes(command_like()))
def test_fuzz_command_shaped_json(raw: bytes) -> None:
    assert_contract_outcome(raw)


@FUZZ
@given(json_bytes(command_like()), st.integers(0, 400), st.binary(max_size=8))
def test_fuzz_corrupted_command_bytes(raw: bytes, cut: int, junk: bytes) -> None:
    assert_contract_outcome(raw[:cut] + junk + raw[cut:])


@FUZZ
@given(
    depth=st.integers(1, 10_000),
    brackets=st.sampled_from([("[", "]"), ('{"a":', "}")]),
    closed=st.booleans(),
    inside_command=st.booleans(),
)
def test_fuzz_deep_nesting_is_refused_past_the_limit(
    depth: int, brackets: tuple[str, str], closed: bool, inside_command: bool
) -> None:
    opener, closer = brackets
    inner = opener * depth + "1" + (closer * depth if closed else "")
    wrapped = encode(START).decode()[:-1] + f',"data":{{"x":{inner}}}}}'
    text = wrapped if inside_command else inner
    within_limit = closed and depth + (2 if inside_command else 0) <= MAX_JSON_DEPTH
    result = outcome(text.encode())
    if isinstance(result, CommandRejectedError):
        assert (result.reason_code == "malformed_json") is not within_limit
    else:
        assert (inside_command, within_limit) == (True, True)


@FUZZ
@given(
    command_id=bounded(128),
    machine_type=type_names,
    machine_id=st.none() | bounded(128),
    lookup_key=bounded(191),
    data=st.none() | st.dictionaries(clean_text, clean_values, max_size=3),
)
def test_fuzz_valid_start_commands_round_trip(
    command_id: str,
    machine_type: str,
    machine_id: str | None,
    lookup_key: str,
    data: dict[str, Any] | None,
) -> None:
    command = Command(command_id, CommandName.START, machine_type, machine_id, lookup_key, data)
    assert decode_command(command.to_json()) == command
