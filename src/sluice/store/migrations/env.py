"""Alembic environment: runs on the connection that ``sluice.store.migrate`` passes in.

The async engine is bridged with ``AsyncConnection.run_sync``, so this file only ever
sees a synchronous ``Connection`` in ``config.attributes["connection"]``. Offline mode
(``--sql``) renders SQL for the dialect named by ``sqlalchemy.url``.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from sluice.store.schema import metadata

config = context.config


def run_offline() -> None:
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("offline migrations need sqlalchemy.url set on the Alembic config")
    context.configure(
        url=url,
        target_metadata=metadata,
        literal_binds=True,
        render_as_batch=url.startswith("sqlite"),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite has little ALTER
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    connection = config.attributes.get("connection")
    if not isinstance(connection, Connection):
        raise RuntimeError(
            "run migrations through sluice.store.migrate.upgrade(engine), "
            'which passes a connection in config.attributes["connection"]'
        )
    run_online(connection)
