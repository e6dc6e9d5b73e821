"""The checked-in DDL in schema/ is exactly what the code's Table objects render."""

from __future__ import annotations

from tests.conftest import ROOT
from worker.ddl import render_ddl
from worker.definition import Registry


def test_checked_in_mysql_ddl_matches_the_tables_in_code() -> None:
    """Regenerate with `smw schema show --dialect mysql > schema/mysql.sql` after a change."""
    rendered = render_ddl(Registry.from_modules(["handlers"]), "mysql")
    assert (ROOT / "schema" / "mysql.sql").read_text(encoding="utf-8") == rendered + "\n"


def test_ddl_has_the_seed_columns_for_each_type_table() -> None:
    ddl = render_ddl(Registry.from_modules(["handlers"]), "mysql")
    block = ddl.split("CREATE TABLE `STATE_MACHINE_ORDER_SAGA` (")[1].split(");")[0]
    seed = [
        "ID",
        "Name",
        "LookupKey",
        "CurrentState",
        "ResumeFromStep",
        "SaveAfterStep",
        "KafkaEventTopic",
        "SerializedState",
        "CreatedTimestamp",
        "UpdatedTimestamp",
        "UsesGlobalLock",
        "UsesLocalLock",
        "UnlockedTimestamp",
        "LastRetryTimestamp",
        "Version",
        "RetryCount",
        "NextRunTimestamp",
        "LeaseOwner",
        "LeaseExpiresTimestamp",
    ]
    assert [c for c in seed if f"`{c}`" not in block] == []
    assert "`UnlockTimestamp` DATETIME(6)" in ddl.split("CREATE TABLE `GLOBAL_LOCK`")[1]
