"""Wire messages: decode and validate commands, validate events, build dead-letter headers.

`decode_command` is the only way bytes from the input topic become a `Command`. Whatever the
bytes are, it returns a valid command or raises `CommandRejectedError` with one of
`REASON_CODES`; the JSON Schemas in `schema/` are the contract it enforces.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from enum import StrEnum
from functools import cache
from pathlib import Path
from typing import Any, Self

from jsonschema import Draft202012Validator, FormatChecker
from jsonschema.exceptions import ValidationError

from worker.errors import CommandRejectedError

MAX_COMMAND_BYTES = 1_048_576
MAX_JSON_DEPTH = 64
MAX_INT_DIGITS = 4000
MAX_PREVIEW_CHARS = 64
MAX_MESSAGE_CHARS = 300
MAX_DETAIL_HEADER_BYTES = 1000

REASON_CODES: frozenset[str] = frozenset(
    {"empty", "oversized", "malformed_json", "schema_violation"}
)

SCHEMA_DIR = Path(__file__).parent / "schemas"

_ADVICE = "; fix the producer to follow schema/command.schema.json"
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_UTC_TIMESTAMP = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?Z"
)
_FORMATS = {"date-time": "an RFC 3339 UTC timestamp ending in Z"}
_JSON_TYPES: tuple[tuple[type, str], ...] = (
    (bool, "boolean"),
    (int, "integer"),
    (float, "number"),
    (str, "string"),
    (list, "array"),
    (dict, "object"),
)


class CommandName(StrEnum):
    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    CANCEL = "cancel"
    ROLLBACK = "rollback"
    RETRY = "retry"
    OVERRIDE = "override"


@dataclass(frozen=True)
class Command:
    """A command from the input topic, as the wire contract defines it."""

    command_id: str
    command: CommandName
    machine_type: str
    machine_id: str | None = None
    lookup_key: str | None = None
    data: dict[str, Any] | None = None
    actor: str | None = None
    reason: str | None = None
    target_state: str | None = None

    def to_json(self) -> bytes:
        """Compact UTF-8 JSON with the fields that are set."""
        payload = {
            item.name: getattr(self, item.name)
            for item in fields(self)
            if getattr(self, item.name) is not None
        }
        payload["command"] = str(self.command)
        text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        return text.encode("utf-8")

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> Self:
        """Validate a parsed message against the command schema and build the command."""
        _check_command(payload)
        data = payload.get("data")
        return cls(
            command_id=payload["command_id"],
            command=CommandName(payload["command"]),
            machine_type=payload["machine_type"],
            machine_id=payload.get("machine_id"),
            lookup_key=payload.get("lookup_key"),
            data=dict(data) if data is not None else None,
            actor=payload.get("actor"),
            reason=payload.get("reason"),
            target_state=payload.get("target_state"),
        )


def decode_command(raw: bytes | None, max_bytes: int = MAX_COMMAND_BYTES) -> Command:
    """Turn a message value into a Command, or raise CommandRejectedError saying why not."""
    if not raw:
        raise CommandRejectedError(
            "command rejected: the message has no value; expected a UTF-8 JSON object" + _ADVICE,
            "empty",
        )
    if len(raw) > max_bytes:
        raise CommandRejectedError(
            f"command rejected: the message is {len(raw)} bytes; expected at most {max_bytes}"
            "; send large data by reference instead",
            "oversized",
        )
    return Command.from_dict(_parse_json(raw))


def validate_event(payload: Mapping[str, Any]) -> None:
    """Raise ValueError naming the first place where payload breaks the event schema."""
    error = _first_error(_event_validator(), payload)
    if error is not None:
        detail = _describe(error, payload, "sequence")
        raise ValueError(_truncate(f"event does not match schema/event.schema.json: {detail}"))


def dead_letter_headers(
    reason_code: str, message: str, topic: str, partition: int, offset: int
) -> list[tuple[str, bytes]]:
    """Kafka headers for a dead-lettered message: the reason and where the message came from."""
    return [
        ("smw.reason", reason_code.encode("utf-8")),
        ("smw.reason.detail", _truncate_utf8(message, MAX_DETAIL_HEADER_BYTES)),
        ("smw.original.topic", topic.encode("utf-8")),
        ("smw.original.partition", str(partition).encode("utf-8")),
        ("smw.original.offset", str(offset).encode("utf-8")),
    ]


def load_schema(name: str) -> dict[str, Any]:
    """One of the JSON Schemas shipped in schema/, by file stem (`command`, `event`)."""
    schema: dict[str, Any] = json.loads(
        (SCHEMA_DIR / f"{name}.schema.json").read_text(encoding="utf-8")
    )
    return schema


@cache
def _command_validator() -> Draft202012Validator:
    schema = load_schema("command")
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


@cache
def _event_validator() -> Draft202012Validator:
    schema = load_schema("event")
    Draft202012Validator.check_schema(schema)
    checker = FormatChecker(formats=())
    checker.checks("date-time")(_is_utc_timestamp)
    return Draft202012Validator(schema, format_checker=checker)


@cache
def _type_name_pattern() -> re.Pattern[str]:
    pattern: str = load_schema("command")["properties"]["machine_type"]["pattern"]
    return re.compile(pattern)


def _check_command(payload: Mapping[str, Any]) -> None:
    error = _first_error(_command_validator(), payload)
    if error is not None:
        raise _violation(_describe(error, payload, "command"))
    machine_type: str = payload["machine_type"]
    pattern = _type_name_pattern()
    if pattern.fullmatch(machine_type) is None:
        raise _violation(
            f"$.machine_type: expected a string matching {pattern.pattern}, "
            f"found {_preview(machine_type)}"
        )


def _first_error(validator: Draft202012Validator, payload: object) -> ValidationError | None:
    """The error to report: unconditional rules before if/then rules, shallow before deep."""
    return min(validator.iter_errors(payload), key=_rank, default=None)


def _rank(error: ValidationError) -> tuple[bool, int]:
    return _in_branch(error), len(error.path)


def _in_branch(error: ValidationError) -> bool:
    return bool(set(error.absolute_schema_path) & {"then", "else"})


def _violation(detail: str) -> CommandRejectedError:
    return CommandRejectedError(
        _truncate(f"command rejected: {_truncate(detail, MAX_MESSAGE_CHARS - 80)}{_ADVICE}"),
        "schema_violation",
    )


def _malformed(problem: str) -> CommandRejectedError:
    return CommandRejectedError(
        f"command rejected: {_truncate(problem, 160)}; expected one UTF-8 JSON object{_ADVICE}",
        "malformed_json",
    )


def _parse_json(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _malformed(f"the message is not UTF-8 (bad byte at offset {exc.start})") from None
    try:
        value = json.loads(
            text,
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
            parse_int=_bounded_int,
            object_pairs_hook=_unique_keys,
        )
    except RecursionError:
        raise _malformed(f"JSON nests deeper than {MAX_JSON_DEPTH} levels") from None
    except json.JSONDecodeError as exc:
        raise _malformed(f"the message is not JSON ({exc})") from None
    except ValueError as exc:
        raise _malformed(f"the message is not valid JSON ({exc})") from None
    if _nesting_exceeds(value, MAX_JSON_DEPTH):
        raise _malformed(f"JSON nests deeper than {MAX_JSON_DEPTH} levels")
    if _SURROGATE_ESCAPE.search(raw) and not _encodes_as_utf8(value):
        raise _malformed("a string holds an unpaired UTF-16 surrogate escape")
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:MAX_PREVIEW_CHARS]} is out of range")
    return value


def _bounded_int(text: str) -> int:
    if len(text) > MAX_INT_DIGITS:
        raise ValueError(f"an integer has {len(text)} digits, more than {MAX_INT_DIGITS}")
    return int(text)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {_preview(key)}")
        obj[key] = value
    return obj


def _nesting_exceeds(value: object, limit: int) -> bool:
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Iterable[object] = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _encodes_as_utf8(value: object) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_utc_timestamp(value: object) -> bool:
    if not isinstance(value, str):
        return True
    if _UTC_TIMESTAMP.fullmatch(value) is None:
        return False
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def _describe(error: ValidationError, root: object, condition_field: str) -> str:
    """Where the value is, what was expected, and a bounded preview of what was found."""
    keyword = error.validator
    expected: Any = error.validator_value
    found: Any = error.instance
    path = error.json_path
    condition = _condition(error, root, condition_field)
    if keyword == "required":
        missing = next(name for name in expected if name not in found)
        return f"{path}: expected field {missing!r}{condition}, found it missing"
    if keyword == "not" and isinstance(expected, dict) and "required" in expected:
        field_name = expected["required"][0]
        return f"{path}.{field_name}: expected no such field{condition}, found one"
    if keyword == "type":
        types = expected if isinstance(expected, list) else [expected]
        return f"{path}: expected {' or '.join(types)}, found {_json_type(found)}"
    if keyword == "enum":
        return f"{path}: expected one of {', '.join(map(str, expected))}, found {_preview(found)}"
    if keyword == "const":
        return f"{path}: expected {expected!r}{condition}, found {_preview(found)}"
    if keyword == "pattern":
        return f"{path}: expected a string matching {expected}, found {_preview(found)}"
    if keyword == "minLength" and expected == 1:
        return f"{path}: expected a non-empty string, found an empty one"
    if keyword == "minLength":
        return f"{path}: expected at least {expected} characters, found {len(found)}"
    if keyword == "maxLength":
        return f"{path}: expected at most {expected} characters, found {len(found)}"
    if keyword == "minimum":
        return f"{path}: expected a number >= {expected}, found {_preview(found)}"
    if keyword == "format":
        wanted = _FORMATS.get(expected, f"a {expected} value")
        return f"{path}: expected {wanted}, found {_preview(found)}"
    return f"{path}: expected the value to satisfy {keyword!r}, found {_preview(found)}"


def _condition(error: ValidationError, root: object, field_name: str) -> str:
    if not _in_branch(error) or not isinstance(root, Mapping):
        return ""
    return f" when {field_name} is {_preview(root.get(field_name))}"


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    kinds = (name for kind, name in _JSON_TYPES if isinstance(value, kind))
    return next(kinds, f"a non-JSON {type(value).__name__}")


def _preview(value: object) -> str:
    if isinstance(value, str):
        suffix = "..." if len(value) > MAX_PREVIEW_CHARS else ""
        return repr(value[:MAX_PREVIEW_CHARS]) + suffix
    if isinstance(value, dict):
        return f"an object with {len(value)} fields"
    if isinstance(value, list):
        return f"an array of {len(value)} items"
    if isinstance(value, int) and value.bit_length() > 128:
        return "a very large integer"
    if value is None or isinstance(value, bool | int | float):
        return _truncate(json.dumps(value), MAX_PREVIEW_CHARS)
    return f"a non-JSON {type(value).__name__}"


def _truncate(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _truncate_utf8(text: str, limit: int) -> bytes:
    encoded = text.encode("utf-8", "replace")
    if len(encoded) <= limit:
        return encoded
    return encoded[:limit].decode("utf-8", "ignore").encode("utf-8")
