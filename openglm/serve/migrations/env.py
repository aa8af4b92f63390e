"""Alembic environment: migrations run on the connection ``Store`` passes in, inside its transaction."""

from alembic import context

from openglm.serve.db import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata,
                  render_as_batch=connection.dialect.name == "sqlite")  # SQLite cannot ALTER most things in place
with context.begin_transaction():
    context.run_migrations()
