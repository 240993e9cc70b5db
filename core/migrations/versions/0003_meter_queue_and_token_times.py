"""meter: queue time, time per output token, engine batch, cached prompt tokens

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 19:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('meter_record', schema=None) as batch_op:
        batch_op.add_column(sa.Column('cached_tokens', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('queue_ms', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('tpot_ms', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('batch', sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('meter_record', schema=None) as batch_op:
        batch_op.drop_column('batch')
        batch_op.drop_column('tpot_ms')
        batch_op.drop_column('queue_ms')
        batch_op.drop_column('cached_tokens')
