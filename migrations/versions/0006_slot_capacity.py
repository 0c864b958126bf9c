"""worker slots: how many jobs each takes at once

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26 07:30:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Existing rows are one-job slots, as every worker was before.
    with op.batch_alter_table('worker_slots', schema=None) as batch_op:
        batch_op.add_column(sa.Column('capacity', sa.Integer(), server_default='1', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('worker_slots', schema=None) as batch_op:
        batch_op.drop_column('capacity')
