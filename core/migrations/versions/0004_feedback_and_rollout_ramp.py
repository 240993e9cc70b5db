"""feedback on served requests; rollouts: outcome guardrail and automatic ramp

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 22:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('feedback',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('request_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('value', sa.Float(), nullable=True),
    sa.Column('label', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('comment', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('key_id', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('adapter', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('version', sa.Integer(), nullable=True),
    sa.Column('arm', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('rollout_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('request_id', 'kind')
    )
    with op.batch_alter_table('feedback', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_feedback_request_id'), ['request_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_feedback_rollout_id'), ['rollout_id'], unique=False)
    with op.batch_alter_table('rollout', schema=None) as batch_op:
        batch_op.add_column(sa.Column('max_success_drop', sa.Float(), nullable=False, server_default='0.02'))
        batch_op.add_column(sa.Column('alpha', sa.Float(), nullable=False, server_default='0.05'))
        batch_op.add_column(sa.Column('ramp', sa.JSON(), nullable=False, server_default='[]'))
        batch_op.add_column(sa.Column('step_min_requests', sa.Integer(), nullable=False, server_default='100'))
        batch_op.add_column(sa.Column('step_min_minutes', sa.Float(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('step_started_at', sa.DateTime(timezone=True), nullable=False,
                                      server_default=sa.func.now()))


def downgrade() -> None:
    with op.batch_alter_table('rollout', schema=None) as batch_op:
        for column in ('step_started_at', 'step_min_minutes', 'step_min_requests', 'ramp', 'alpha',
                       'max_success_drop'):
            batch_op.drop_column(column)
    op.drop_table('feedback')
