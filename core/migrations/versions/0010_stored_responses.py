"""stored Responses API answers (store: true) for retrieval and previous_response_id

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 23:55:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0010'
down_revision: str | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'stored_response',
        sa.Column('id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('key_id', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column('previous_response_id', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column('input_items', sa.JSON(), nullable=False),
        sa.Column('response', sa.JSON(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_stored_response_key_id', 'stored_response', ['key_id'])


def downgrade() -> None:
    op.drop_index('ix_stored_response_key_id', table_name='stored_response')
    op.drop_table('stored_response')
