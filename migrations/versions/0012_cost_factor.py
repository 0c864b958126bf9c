"""cost factor of a job: its minutes are charged times this (the model's, or a chain's sum);
the cleaning model a chain runs on the vocals of its first (`/split clean:`)

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 13:50:00
"""

import sqlalchemy as sa
from alembic import op


revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Jobs admitted before costed minutes ran demucs models: a factor of 1.
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('cost_factor', sa.Float(), server_default='1.0', nullable=False))
        batch_op.add_column(sa.Column('clean_model', sa.String(length=128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('clean_model')
        batch_op.drop_column('cost_factor')
