"""distributed mode: worker slots, queue job id and transfer URLs of a job

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26 03:52:39.144232
"""

from alembic import op
import sqlalchemy as sa
import core.db


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A new table and two nullable columns: existing rows need nothing.
    op.create_table('worker_slots',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('host', sa.String(length=255), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('device', sa.String(length=32), nullable=False),
    sa.Column('model', sa.String(length=64), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=True),
    sa.Column('started_at', core.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('seen_at', core.db.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_worker_slots'))
    )
    with op.batch_alter_table('worker_slots', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_worker_slots_seen_at'), ['seen_at'], unique=False)

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('queue_job_id', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('transfer', sa.JSON(), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('transfer')
        batch_op.drop_column('queue_job_id')

    with op.batch_alter_table('worker_slots', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_worker_slots_seen_at'))

    op.drop_table('worker_slots')
