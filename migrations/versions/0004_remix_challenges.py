"""remix challenges: challenges, their entries and votes; who may start them

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 02:24:29.608764
"""

from alembic import op
import sqlalchemy as sa
import core.db


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # New tables only, and one nullable column: existing rows need nothing.
    op.create_table('challenges',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('created_at', core.db.UTCDateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column('updated_at', core.db.UTCDateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column('guild_id', sa.BigInteger(), nullable=False),
    sa.Column('channel_id', sa.BigInteger(), nullable=False),
    sa.Column('thread_id', sa.BigInteger(), nullable=True),
    sa.Column('announcement_message_id', sa.BigInteger(), nullable=True),
    sa.Column('host_id', sa.BigInteger(), nullable=False),
    sa.Column('title', sa.String(length=100), nullable=False),
    sa.Column('rules', sa.Text(), nullable=False, server_default=''),
    sa.Column('source_name', sa.String(length=255), nullable=False, server_default=''),
    sa.Column('stems', sa.String(length=128), nullable=False, server_default='all'),
    sa.Column('format', sa.String(length=16), nullable=False, server_default='mp3'),
    sa.Column('anonymous', sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column('submit_deadline', core.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('vote_deadline', core.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False, server_default='splitting'),
    sa.Column('job_id', sa.Integer(), nullable=True),
    sa.Column('result_message_id', sa.BigInteger(), nullable=True),
    sa.Column('ended_at', core.db.UTCDateTime(timezone=True), nullable=True),
    sa.Column('ended_by', sa.BigInteger(), nullable=True),
    sa.Column('end_reason', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_challenges'))
    )
    with op.batch_alter_table('challenges', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_challenges_guild_id'), ['guild_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_challenges_job_id'), ['job_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_challenges_state'), ['state'], unique=False)
        batch_op.create_index(batch_op.f('ix_challenges_thread_id'), ['thread_id'], unique=False)

    op.create_table('challenge_entries',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('challenge_id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.BigInteger(), nullable=False),
    sa.Column('file_path', sa.Text(), nullable=False),
    sa.Column('original_name', sa.String(length=255), nullable=False),
    sa.Column('duration_s', sa.Float(), nullable=True),
    sa.Column('size_bytes', sa.BigInteger(), nullable=True),
    sa.Column('submitted_at', core.db.UTCDateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column('replaced', sa.Integer(), nullable=False, server_default='0'),
    sa.Column('position', sa.Integer(), nullable=True),
    sa.Column('message_id', sa.BigInteger(), nullable=True),
    sa.ForeignKeyConstraint(['challenge_id'], ['challenges.id'], name=op.f('fk_challenge_entries_challenge_id_challenges'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_challenge_entries')),
    sa.UniqueConstraint('challenge_id', 'user_id', name=op.f('uq_challenge_entries_challenge_id'))
    )
    with op.batch_alter_table('challenge_entries', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_challenge_entries_challenge_id'), ['challenge_id'], unique=False)

    op.create_table('challenge_votes',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('challenge_id', sa.Integer(), nullable=False),
    sa.Column('voter_id', sa.BigInteger(), nullable=False),
    sa.Column('entry_id', sa.Integer(), nullable=False),
    sa.Column('voted_at', core.db.UTCDateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column('changes', sa.Integer(), nullable=False, server_default='0'),
    sa.ForeignKeyConstraint(['challenge_id'], ['challenges.id'], name=op.f('fk_challenge_votes_challenge_id_challenges'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['entry_id'], ['challenge_entries.id'], name=op.f('fk_challenge_votes_entry_id_challenge_entries'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_challenge_votes')),
    sa.UniqueConstraint('challenge_id', 'voter_id', name=op.f('uq_challenge_votes_challenge_id'))
    )
    with op.batch_alter_table('challenge_votes', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_challenge_votes_challenge_id'), ['challenge_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_challenge_votes_entry_id'), ['entry_id'], unique=False)

    with op.batch_alter_table('guild_policies', schema=None) as batch_op:
        batch_op.add_column(sa.Column('challenge_role_id', sa.BigInteger(), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('guild_policies', schema=None) as batch_op:
        batch_op.drop_column('challenge_role_id')

    with op.batch_alter_table('challenge_votes', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_challenge_votes_entry_id'))
        batch_op.drop_index(batch_op.f('ix_challenge_votes_challenge_id'))

    op.drop_table('challenge_votes')
    with op.batch_alter_table('challenge_entries', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_challenge_entries_challenge_id'))

    op.drop_table('challenge_entries')
    with op.batch_alter_table('challenges', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_challenges_thread_id'))
        batch_op.drop_index(batch_op.f('ix_challenges_state'))
        batch_op.drop_index(batch_op.f('ix_challenges_job_id'))
        batch_op.drop_index(batch_op.f('ix_challenges_guild_id'))

    op.drop_table('challenges')
