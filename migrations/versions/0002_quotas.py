"""quotas, policies, results cache

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 01:46:31.065289
"""

from alembic import op
import sqlalchemy as sa
import core.db


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Jobs made before this revision hold no slot and no reservation: the defaults say so.
    op.create_table('guild_policies',
    sa.Column('guild_id', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('user_minutes_per_day', sa.Float(), nullable=True),
    sa.Column('guild_minutes_per_day', sa.Float(), nullable=True),
    sa.Column('user_concurrent_jobs', sa.Integer(), nullable=True),
    sa.Column('guild_queued_jobs', sa.Integer(), nullable=True),
    sa.Column('max_track_minutes', sa.Float(), nullable=True),
    sa.Column('allowed_models', sa.Text(), nullable=True),
    sa.Column('allowed_formats', sa.Text(), nullable=True),
    sa.Column('links_allowed', sa.Boolean(), nullable=True),
    sa.Column('allowed_channels', sa.Text(), nullable=True),
    sa.Column('default_model', sa.String(length=64), nullable=True),
    sa.Column('default_format', sa.String(length=16), nullable=True),
    sa.PrimaryKeyConstraint('guild_id', name=op.f('pk_guild_policies'))
    )
    op.create_table('quota_slots',
    sa.Column('guild_id', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('user_id', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('active', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('guild_id', 'user_id', name=op.f('pk_quota_slots'))
    )
    op.create_table('quota_usage',
    sa.Column('guild_id', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('user_id', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('day', sa.Date(), nullable=False),
    sa.Column('used_s', sa.Float(), nullable=False),
    sa.Column('reserved_s', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('guild_id', 'user_id', 'day', name=op.f('pk_quota_usage'))
    )
    op.create_table('role_tiers',
    sa.Column('guild_id', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('role_id', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('user_minutes_per_day', sa.Float(), nullable=True),
    sa.Column('user_concurrent_jobs', sa.Integer(), nullable=True),
    sa.Column('max_track_minutes', sa.Float(), nullable=True),
    sa.PrimaryKeyConstraint('guild_id', 'role_id', name=op.f('pk_role_tiers'))
    )
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('limits', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('slot_state', sa.String(length=16), nullable=False, server_default='none'))
        batch_op.add_column(sa.Column('quota_state', sa.String(length=16), nullable=False, server_default='none'))
        batch_op.add_column(sa.Column('reserved_s', sa.Float(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('quota_day', sa.Date(), nullable=True))
        batch_op.add_column(sa.Column('input_sha256', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('cache_hit', sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column('artifacts_deleted_at', core.db.UTCDateTime(timezone=True), nullable=True))
        batch_op.create_index(batch_op.f('ix_jobs_input_sha256'), ['input_sha256'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_jobs_input_sha256'))
        batch_op.drop_column('artifacts_deleted_at')
        batch_op.drop_column('cache_hit')
        batch_op.drop_column('input_sha256')
        batch_op.drop_column('quota_day')
        batch_op.drop_column('reserved_s')
        batch_op.drop_column('quota_state')
        batch_op.drop_column('slot_state')
        batch_op.drop_column('limits')

    op.drop_table('role_tiers')
    op.drop_table('quota_usage')
    op.drop_table('quota_slots')
    op.drop_table('guild_policies')
