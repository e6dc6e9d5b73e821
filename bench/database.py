"""The benchmark's own database: created fresh, filled with machines, measured, dropped.

Every phase writes to the real tables from `worker.tables`, created by `Store.ensure_schema`,
so the raw floor and the engine write rows of the same shape and size.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import MySQLdb
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url

from bench.cpu import pid_from_file
from bench.machines import bench_saga, initial_data
from worker import decisions, tables
from worker.decisions import Happening
from worker.definition import Registry
from worker.store import Store

DEFAULT_SERVER_URL = "mysql+mysqldb://root@127.0.0.1:3306/smw_test"
DEFAULT_DATABASE = "smw_bench"


@dataclass(frozen=True)
class Counters:
    """A snapshot of server-wide status counters (they include every client of the server)."""

    com_commit: int
    questions: int
    admin_commands: int
    taken_at: float

    def minus(self, earlier: Counters) -> Counters:
        return Counters(
            self.com_commit - earlier.com_commit,
            self.questions - earlier.questions,
            self.admin_commands - earlier.admin_commands,
            self.taken_at - earlier.taken_at,
        )


class BenchDatabase:
    """A database of its own on the server SMW_DATABASE_URL points at."""

    def __init__(self, server_url: str | None = None, name: str = DEFAULT_DATABASE) -> None:
        base = make_url(server_url or os.environ.get("SMW_DATABASE_URL", DEFAULT_SERVER_URL))
        if not base.drivername.startswith("mysql"):
            raise SystemExit(f"bench needs MySQL or MariaDB, got {base.drivername}")
        self.server: URL = base.set(database="")
        self.name = name
        self.url = base.set(database=name).render_as_string(hide_password=False)
        self.registry = Registry([bench_saga])
        self.table = tables.machine_table(bench_saga.name)

    # -- lifecycle ------------------------------------------------------------------------

    def create(self) -> None:
        self._admin(f"DROP DATABASE IF EXISTS `{self.name}`")
        self._admin(f"CREATE DATABASE `{self.name}` CHARACTER SET utf8mb4")
        store = Store(self.url, self.registry)
        store.ensure_schema()
        store.engine.dispose()

    def drop(self) -> None:
        self._admin(f"DROP DATABASE IF EXISTS `{self.name}`")

    def _admin(self, sql: str) -> None:
        admin = create_engine(self.server, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(text(sql))
        finally:
            admin.dispose()

    def store(self, **kwargs: Any) -> Store:
        return Store(self.url, self.registry, **kwargs)

    # -- raw driver connections -----------------------------------------------------------

    def connect_raw(self, database: str | None = None) -> Any:
        """A plain MySQLdb connection (autocommit off), as the engine's driver would open."""
        url = make_url(self.url)
        kwargs: dict[str, Any] = {
            "host": url.host or "127.0.0.1",
            "port": url.port or 3306,
            "user": url.username or "root",
            "charset": "utf8mb4",
        }
        if url.password:
            kwargs["password"] = url.password
        db = self.name if database is None else database
        if db:
            kwargs["database"] = db
        conn = MySQLdb.connect(**kwargs)
        conn.autocommit(False)
        cursor = conn.cursor()
        cursor.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
        cursor.close()
        return conn

    @contextmanager
    def raw(self, database: str | None = None) -> Iterator[Any]:
        conn = self.connect_raw(database)
        try:
            yield conn
        finally:
            conn.close()

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with self.raw() as conn:
            cursor = conn.cursor()
            cursor.execute(sql, args or None)
            rows = list(cursor.fetchall())
            conn.commit()
            return rows

    # -- filling and checking -------------------------------------------------------------

    def reset(self) -> None:
        """Empty every table the benchmark writes."""
        with self.raw() as conn:
            cursor = conn.cursor()
            for name in (
                self.table.name,
                tables.history.name,
                tables.outbox.name,
                tables.processed_command.name,
            ):
                cursor.execute(f"TRUNCATE TABLE `{name}`")
            conn.commit()

    def create_machines(self, count: int, threads: int = 8) -> list[str]:
        """Create `count` pending machines the way a start command does; returns their ids."""
        store = self.store()
        ids = [str(uuid.uuid4()) for _ in range(count)]
        now = time.time()

        def make(part: list[tuple[int, str]]) -> None:
            for index, machine_id in part:
                at = Happening(now=store.db_now(), command_id=f"cmd-{machine_id}")
                decision = decisions.create(
                    bench_saga, machine_id, f"acct-{index:06d}", initial_data(index, now), at
                )
                store.create_machine(decision)

        indexed = list(enumerate(ids))
        workers = [
            threading.Thread(target=make, args=(indexed[i::threads],)) for i in range(threads)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        store.engine.dispose()
        return ids

    def count_state(self, state: str) -> int:
        rows = self.query(
            f"SELECT COUNT(*) FROM `{self.table.name}` WHERE CurrentState = %s", state
        )
        return int(rows[0][0])

    def step_row_bytes(self) -> float:
        """Average bytes of JSON a step writes: SerializedState, history data, outbox payload."""
        machine = self.query(f"SELECT AVG(LENGTH(SerializedState)) FROM `{self.table.name}`")
        history = self.query(
            "SELECT AVG(LENGTH(h.InputData) + LENGTH(h.OutputData) + LENGTH(o.Payload)) "
            f"FROM `{tables.history.name}` h JOIN `{tables.outbox.name}` o "
            "ON o.EventID = h.EventID WHERE h.Event = 'step_succeeded'"
        )
        return float(machine[0][0] or 0) + float(history[0][0] or 0)

    # -- server facts ---------------------------------------------------------------------

    def counters(self) -> Counters:
        rows = dict(
            self.query(
                "SHOW GLOBAL STATUS WHERE Variable_name IN "
                "('Com_commit', 'Questions', 'Com_admin_commands')"
            )
        )
        return Counters(
            int(rows["Com_commit"]),
            int(rows["Questions"]),
            int(rows.get("Com_admin_commands", 0)),
            time.monotonic(),
        )

    def server_pid(self) -> int | None:
        """The database server's pid when it runs on this host (for its CPU time)."""
        if make_url(self.url).host not in ("127.0.0.1", "localhost", None):
            return None
        pid_file = self.query("SELECT @@pid_file")[0][0]
        return pid_from_file(Path(str(pid_file)), ("mariadbd", "mysqld")) if pid_file else None

    def started_at(self) -> float:
        """When the server started, from its Uptime (to notice a restart during a run)."""
        uptime = dict(self.query("SHOW GLOBAL STATUS WHERE Variable_name = 'Uptime'"))
        return time.time() - float(uptime["Uptime"])

    def version(self) -> str:
        return str(self.query("SELECT VERSION()")[0][0])

    def durability(self) -> str:
        rows = dict(
            self.query(
                "SHOW GLOBAL VARIABLES WHERE Variable_name IN "
                "('innodb_flush_log_at_trx_commit', 'sync_binlog', 'log_bin')"
            )
        )
        return ", ".join(f"{k}={v}" for k, v in sorted(rows.items()))
