"""A machine type name reaches DDL (its table's name) only if it is a plain identifier.

The name must match ^[a-z][a-z0-9_]{0,47}$: `MachineType` refuses anything else when the
type is defined, and `tables.machine_table_name` refuses it again, so neither quotes,
backticks, semicolons, unicode, upper case, an empty name nor an overlong one can ever end up
inside a CREATE TABLE. Names in messages are only looked up, never turned into tables.
"""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker import MachineType, Registry, step, tables
from worker.definition import TYPE_NAME
from worker.errors import CommandRejectedError, InvalidTypeNameError, UnknownMachineTypeError
from worker.messages import decode_command

pytestmark = pytest.mark.unit

HOSTILE = [
    "",
    "Order",
    "ORDER_SAGA",
    "order-saga",
    "order saga",
    "order.saga",
    "1order",
    "_order",
    "order'",
    'order"',
    "`order`",
    "order`; DROP TABLE `GLOBAL_LOCK",
    "order'; DROP TABLE GLOBAL_LOCK; --",
    "order;",
    "order\n",
    "order\x00",
    "order/*x*/",
    "ordér",
    "注文",
    "order\u200b",
    "ｏrder",  # noqa: RUF001  # a fullwidth letter that looks like an ascii one
    "a" * 49,
]
VALID = ["a", "order_saga", "o2", "a" * 48, "z_9_"]


@pytest.mark.parametrize("name", HOSTILE, ids=repr)
def test_a_machine_type_with_a_name_that_is_no_plain_identifier_cannot_be_defined(
    name: str,
) -> None:
    with pytest.raises(InvalidTypeNameError) as raised:
        MachineType(name=name, steps=(step("only", lambda ctx: None),))
    assert raised.value.name == name
    assert raised.value.reason_code == "invalid_type_name"


@pytest.mark.parametrize("name", HOSTILE, ids=repr)
def test_the_table_name_is_refused_too_so_it_never_reaches_ddl(name: str) -> None:
    with pytest.raises(InvalidTypeNameError):
        tables.machine_table_name(name)
    with pytest.raises(InvalidTypeNameError):
        tables.machine_table(name)


@pytest.mark.parametrize("name", [None, 7, b"order", ["order"]], ids=repr)
def test_a_name_that_is_not_a_string_is_refused(name: object) -> None:
    with pytest.raises(InvalidTypeNameError):
        MachineType(name=name, steps=(step("only", lambda ctx: None),))  # type: ignore[arg-type]


@pytest.mark.parametrize("name", VALID)
def test_plain_identifiers_up_to_48_characters_are_accepted(name: str) -> None:
    machine_type = MachineType(name=name, steps=(step("only", lambda ctx: None),))
    assert machine_type.name == name
    assert tables.machine_table_name(name) == f"STATE_MACHINE_{name.upper()}"


@pytest.mark.parametrize("name", HOSTILE, ids=repr)
def test_a_hostile_type_name_in_a_message_is_only_looked_up(name: str) -> None:
    registry = Registry([MachineType(name="order_saga", steps=(step("s", lambda ctx: None),))])
    with pytest.raises(UnknownMachineTypeError):
        registry.get_type(name)
    payload = (
        '{"command_id": "c1", "command": "start", "lookup_key": "k", "machine_type": '
        + json.dumps(name)
        + "}"
    ).encode("utf-8")
    with pytest.raises(CommandRejectedError) as raised:
        decode_command(payload)
    assert raised.value.reason_code == "schema_violation"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_any_name_is_accepted_exactly_when_it_is_a_plain_identifier(name: str) -> None:
    plain = re.fullmatch(r"[a-z][a-z0-9_]{0,47}", name) is not None
    assert (TYPE_NAME.fullmatch(name) is not None) == plain
    if plain:
        table = tables.machine_table_name(name)
        assert re.fullmatch(r"STATE_MACHINE_[A-Z][A-Z0-9_]{0,47}", table)
    else:
        with pytest.raises(InvalidTypeNameError):
            tables.machine_table_name(name)
        with pytest.raises(InvalidTypeNameError):
            MachineType(name=name, steps=(step("only", lambda ctx: None),))
