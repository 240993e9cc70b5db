"""Alembic environment for the one loragate database: registry and gateway tables.

loragate hands it an open connection (see ``loragate.database.migrate``).
"""

from alembic import context
from sqlmodel import SQLModel

from loragate.gateway import models as gateway_models  # noqa: F401  (registers the tables)
from loragate.registry import models as registry_models  # noqa: F401

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=SQLModel.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
