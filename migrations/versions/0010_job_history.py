"""indexes for the sweeper's finished rows (past retention, past the job history) and live tokens

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 07:30:00
"""

from alembic import op


revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The sweeper deletes the rows of jobs that ended before a moment, oldest first, in
    # batches (`core.jobs.store.expired_history`), and finds the files past retention the same
    # way: a range of finished_at, instead of a scan of every row ever written.
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index('ix_jobs_finished_at', ['finished_at'], unique=False)
    # The queued jobs whose message can still be edited: the tokens of the last 15 minutes
    # (`core.jobs.store.editable_queued`), not every token of the job history.
    with op.batch_alter_table('interaction_tokens', schema=None) as batch_op:
        batch_op.create_index('ix_interaction_tokens_expires_at', ['expires_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('interaction_tokens', schema=None) as batch_op:
        batch_op.drop_index('ix_interaction_tokens_expires_at')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_finished_at')
