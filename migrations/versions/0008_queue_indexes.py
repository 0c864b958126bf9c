"""an index for the fair order's "who was served lately" query

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 05:30:00
"""

from alembic import op


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Queued jobs are found through ix_jobs_state (0001); the served times through this one,
    # a range of started_at that holds the server and user too (no read of the rows).
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index('ix_jobs_started_at_guild_user', ['started_at', 'guild_id', 'user_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_started_at_guild_user')
