"""Rendering the schema as DDL text, for `smw schema show` and the checked-in schema/ files."""

from __future__ import annotations

from sqlalchemy.dialects import mysql, sqlite
from sqlalchemy.schema import CreateIndex, CreateTable

from worker import tables
from worker.definition import Registry


def render_ddl(registry: Registry, dialect: str = "mysql") -> str:
    """CREATE TABLE and CREATE INDEX statements for the shared tables and each type's table."""
    target = mysql.dialect() if dialect == "mysql" else sqlite.dialect()
    for name in registry:
        tables.machine_table(name)
    wanted = set(tables.shared_table_names()) | {tables.machine_table_name(n) for n in registry}
    statements: list[str] = []
    for table in tables.metadata.sorted_tables:
        if table.name not in wanted:
            continue
        statements.append(str(CreateTable(table).compile(dialect=target)).strip() + ";")
        statements.extend(
            str(CreateIndex(index).compile(dialect=target)).strip() + ";"
            for index in sorted(table.indexes, key=lambda i: str(i.name))
        )
    return "\n\n".join(statements)
