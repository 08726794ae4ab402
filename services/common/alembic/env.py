"""The one Alembic environment every service's migrations run in.

Driven only through ``services.common.migrations``, which passes the open connection, the
service's version table and (for autogenerate) its metadata in ``config.attributes``.
"""

from __future__ import annotations

from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy import MetaData
from sqlalchemy.engine import Connection


def _include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    # A table only in the database may belong to another service sharing it: never drop it.
    return not (type_ == "table" and reflected and compare_to is None)


def _render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    # SQLModel's AutoString renders as sqlmodel.sql.sqltypes.AutoString(); import it only then.
    if type_ == "type" and type(obj).__module__.startswith("sqlmodel"):
        autogen_context.imports.add("import sqlmodel")
    return False


def _run_migrations() -> None:
    config = context.config
    connection = config.attributes.get("connection")
    if context.is_offline_mode() or not isinstance(connection, Connection):
        raise RuntimeError("run migrations through services.common.migrations, not the CLI")
    metadata: MetaData | None = config.attributes.get("target_metadata")
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=config.attributes["version_table"],
        render_as_batch=connection.dialect.name == "sqlite",
        include_object=_include_object,
        render_item=_render_item,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


_run_migrations()
