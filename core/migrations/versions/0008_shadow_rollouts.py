"""shadow rollouts: a rollout's mode and the pairs of answers it compares

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28 09:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('rollout', schema=None) as batch_op:
        batch_op.add_column(sa.Column('mode', sqlmodel.sql.sqltypes.AutoString(), nullable=False,
                                      server_default='split'))
    op.create_table(
        'shadow_pair',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('rollout_id', sa.Integer(), nullable=False),
        sa.Column('request_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('status', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('prompt_sha256', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column('production_sha256', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column('candidate_sha256', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column('prompt', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column('production_output', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column('candidate_output', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column('exact', sa.Boolean(), nullable=True),
        sa.Column('token_f1', sa.Float(), nullable=True),
        sa.Column('latency_ms', sa.Float(), nullable=True),
        sa.Column('error', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_shadow_pair_rollout_id', 'shadow_pair', ['rollout_id'])


def downgrade() -> None:
    op.drop_index('ix_shadow_pair_rollout_id', table_name='shadow_pair')
    op.drop_table('shadow_pair')
    with op.batch_alter_table('rollout', schema=None) as batch_op:
        batch_op.drop_column('mode')
