"""jobs.notified_at: when the user was told how the job ended

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 05:30:00
"""

from alembic import op
import sqlalchemy as sa
import core.db


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('notified_at', core.db.UTCDateTime(timezone=True), nullable=True))
    # Jobs that ended before the upgrade count as told: a bot restarted on the new version
    # must not report old endings again.
    op.execute("UPDATE jobs SET notified_at = COALESCE(finished_at, updated_at) "
               "WHERE state IN ('done', 'failed', 'cancelled')")


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('notified_at')
