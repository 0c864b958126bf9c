"""render options of a job: tempo, transpose, mix (canonical JSON text, "" for plain stems)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 10:45:00
"""

import sqlalchemy as sa
from alembic import op


revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Text rather than JSON: the results cache compares it for equality, which PostgreSQL's
    # json type cannot do. Existing jobs rendered their stems as separated: "".
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('render_options', sa.String(length=255), server_default='', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('render_options')
