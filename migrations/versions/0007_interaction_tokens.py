"""interaction tokens in a table of their own, apart from the job rows workers read

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 04:30:00
"""

from alembic import op
import sqlalchemy as sa
import core.db


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The tokens move, unfinished jobs' included: a bot restarted after the upgrade still
    # edits their replies.
    op.create_table('interaction_tokens',
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('token', sa.Text(), nullable=False),
    sa.Column('expires_at', core.db.UTCDateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_interaction_tokens_job_id_jobs'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('job_id', name=op.f('pk_interaction_tokens'))
    )
    op.execute("INSERT INTO interaction_tokens (job_id, token, expires_at) "
               "SELECT id, interaction_token, token_expires_at FROM jobs WHERE interaction_token IS NOT NULL")
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('token_expires_at')
        batch_op.drop_column('interaction_token')


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('interaction_token', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('token_expires_at', core.db.UTCDateTime(timezone=True), nullable=True))
    op.execute("UPDATE jobs SET "
               "interaction_token = (SELECT token FROM interaction_tokens t WHERE t.job_id = jobs.id), "
               "token_expires_at = (SELECT expires_at FROM interaction_tokens t WHERE t.job_id = jobs.id)")
    op.drop_table('interaction_tokens')
