"""engine replicas that announce themselves to the gateways' pools

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 19:50:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'engine_replica',
        sa.Column('url', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('base_model', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('max_loras', sa.Integer(), nullable=False),
        sa.Column('slots', sa.Integer(), nullable=False),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('url'),
    )
    op.create_index('ix_engine_replica_base_model', 'engine_replica', ['base_model'])


def downgrade() -> None:
    op.drop_index('ix_engine_replica_base_model', table_name='engine_replica')
    op.drop_table('engine_replica')
