"""versions declare an output check; the meter records the share of a request's answers that passed it

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28 01:50:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('adapter_version', schema=None) as batch_op:
        batch_op.add_column(sa.Column('output_check', sa.JSON(), nullable=True))
    with op.batch_alter_table('meter_record', schema=None) as batch_op:
        batch_op.add_column(sa.Column('output_ok', sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('meter_record', schema=None) as batch_op:
        batch_op.drop_column('output_ok')
    with op.batch_alter_table('adapter_version', schema=None) as batch_op:
        batch_op.drop_column('output_check')
