"""streaming links policy

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 02:17:06.966639
"""

from alembic import op
import sqlalchemy as sa
import core.db


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('guild_policies', schema=None) as batch_op:
        batch_op.add_column(sa.Column('streaming_links_allowed', sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('guild_policies', schema=None) as batch_op:
        batch_op.drop_column('streaming_links_allowed')

